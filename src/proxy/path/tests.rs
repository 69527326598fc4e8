use super::*;

fn norm(p: &str) -> Result<String, PathError> {
    normalize(p).map(|c| c.into_owned())
}

#[test]
fn plain_paths_are_borrowed_unchanged() {
    for p in [
        "/v1/chat/completions",
        "/v1/files/file-AbC123/content",
        "/v1/models",
    ] {
        assert!(
            matches!(normalize(p), Ok(Cow::Borrowed(b)) if b == p),
            "{p}"
        );
    }
}

#[test]
fn spellings_of_chat_become_chat() {
    for p in [
        "/v1//chat/completions",
        "/v1/chat/%63ompletions",
        "/v1/Chat/Completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/%43OMPLETIONS",
        "/v1/%2e/chat/completions",
        "/v1/x/%2E%2E/chat/completions",
    ] {
        assert_eq!(norm(p).as_deref(), Ok("/v1/chat/completions"), "{p}");
    }
}

#[test]
fn paths_leaving_v1_are_refused() {
    for p in [
        "/v1/../anything",
        "/v1/..",
        "/v1/x/../../v2/chat",
        "/v1/%2e%2e/admin",
        "/v1/",
        "/v1//",
    ] {
        assert_eq!(norm(p), Err(PathError::LeavesV1), "{p}");
    }
}

#[test]
fn hidden_separators_and_bad_escapes_are_refused() {
    for p in [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/chat%5Ccompletions",
        "/v1/chat/completions%00",
        "/v1/chat/completions%0a",
        "/v1/chat/completions%",
        "/v1/chat/completions%4",
        "/v1/chat/completions%zz",
    ] {
        assert_eq!(norm(p), Err(PathError::BadEscape), "{p}");
    }
}

#[test]
fn other_escapes_are_kept_upper_cased() {
    assert_eq!(
        norm("/v1/files/a%20b%3a").as_deref(),
        Ok("/v1/files/a%20b%3A")
    );
}

#[test]
fn ids_keep_their_case() {
    assert_eq!(
        norm("/v1//files/File-AbC").as_deref(),
        Ok("/v1/files/File-AbC")
    );
}

#[test]
fn families() {
    assert_eq!(family("/v1/chat/completions"), "chat");
    assert_eq!(family("/v1/fine_tuning/jobs"), "fine_tuning");
    assert_eq!(family("/v1/batches"), "batches");
    assert!(is_metered_family("chat"));
    // Followed and metered line by line (`crate::batches`).
    assert!(is_metered_family("batches"));
    for f in [
        "fine_tuning",
        "realtime",
        "threads",
        "vector_stores",
        "whatever",
    ] {
        assert!(!is_metered_family(f), "{f}");
    }
}

#[test]
fn azure_shaped_paths_name_a_plain_deployment() {
    assert_eq!(
        from_azure("/openai/deployments/gpt-4o/chat/completions"),
        Some(Ok(("gpt-4o", "/v1/chat/completions".to_owned())))
    );
    assert_eq!(
        from_azure("/openai/deployments/my.dep_1/embeddings"),
        Some(Ok(("my.dep_1", "/v1/embeddings".to_owned())))
    );
    assert_eq!(from_azure("/v1/chat/completions"), None);
    assert_eq!(from_azure("/openai/models"), None);
    for bad in [
        "/openai/deployments//chat/completions",
        "/openai/deployments/../x",
        "/openai/deployments/a%2Fb/chat/completions",
        "/openai/deployments/a b/chat/completions",
    ] {
        assert_eq!(from_azure(bad), Some(Err(PathError::BadEscape)), "{bad}");
    }
    // What follows the deployment is normalised as any /v1/ path.
    let (_, p) = from_azure("/openai/deployments/d/../../admin")
        .unwrap()
        .unwrap();
    assert_eq!(normalize(&p), Err(PathError::LeavesV1));
}
