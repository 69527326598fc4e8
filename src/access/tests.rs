use super::*;

#[test]
fn keys_look_right_and_differ() {
    let a = new_key();
    let b = new_key();
    assert!(a.starts_with("tg-"));
    assert_ne!(a, b);
    assert!(a.len() >= 3 + 40, "{a}");
    assert!(a[3..].bytes().all(|c| c.is_ascii_alphanumeric()));
    assert!(new_key_id().starts_with("key_"));
}

#[test]
fn base62_of_known_values() {
    assert_eq!(base62(&[0, 61]), "z");
    assert_eq!(base62(&[0, 62]), "10");
    assert_eq!(base62(&[1, 0]), "48");
}

#[test]
fn find_and_revoke() {
    let keys = Keys::default();
    let k = new_key();
    keys.insert(KeyEntry {
        id: "key_1".into(),
        user: "ann".into(),
        digest: digest(&k),
        last_used: AtomicI64::new(0),
        tags: Default::default(),
        project: None,
    });
    assert_eq!(keys.find(&k).unwrap().user, "ann");
    assert!(keys.find("tg-wrong").is_none());
    let mut h = HeaderMap::new();
    h.insert("authorization", format!("Bearer {k}").parse().unwrap());
    assert_eq!(user_from_key(&keys, &h, 42).unwrap().user, "ann");
    assert_eq!(keys.last_used("key_1"), Some(42));
    keys.remove("key_1");
    assert!(keys.find(&k).is_none());
    let e = user_from_key(&keys, &h, 43).unwrap_err();
    assert_eq!(e.code, Some("invalid_api_key"));
}

#[test]
fn admin_rules() {
    let loop_ip: SocketAddr = "127.0.0.1:5".parse().unwrap();
    let far: SocketAddr = "10.1.2.3:5".parse().unwrap();
    let none = HeaderMap::new();
    assert!(admin(None, &none, loop_ip).is_ok());
    assert_eq!(admin(None, &none, far).unwrap_err().status, 403);
    let d = digest("s3cret");
    assert_eq!(admin(Some(&d), &none, loop_ip).unwrap_err().status, 401);
    let mut h = HeaderMap::new();
    h.insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(admin(Some(&d), &h, far).is_ok());
    h.insert("authorization", "Bearer s3cre".parse().unwrap());
    assert_eq!(admin(Some(&d), &h, far).unwrap_err().status, 401);
}
