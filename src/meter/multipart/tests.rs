use super::*;

#[test]
fn multipart_model_field() {
    let body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF....\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--b--\r\n";
    assert_eq!(
        find_multipart_model(body).as_deref(),
        Some("gpt-4o-transcribe")
    );
    assert_eq!(
        find_multipart_model(b"--b\r\nname=\"model\"\r\n\r\ncut"),
        None
    );
}
