use storaged_tests::*;

#[test]
fn write_then_read_back() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"v1","size":"64MiB"}"#);
    let mut c = connect_retry(&s.socket_of("v1"), 1);
    assert_eq!(c.capacity(), 64 << 20);
    let p = pattern(8192, 4096, 1);
    assert_eq!(c.write(0, 4096, &p), 0);
    assert_eq!(c.read(0, 4096, 8192).unwrap(), p);
}
