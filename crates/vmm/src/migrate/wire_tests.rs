use super::*;
use std::os::unix::net::UnixStream;

type Ends<'a> = (
    Result<Conn<&'a UnixStream>, String>,
    Result<Conn<&'a UnixStream>, String>,
);

/// Runs both sides' handshakes on a connected pair.
fn shake<'a>(
    a: &'a UnixStream,
    b: &'a UnixStream,
    ks: Option<&[u8]>,
    kd: Option<&[u8]>,
) -> Ends<'a> {
    let t = Some(Duration::from_secs(5));
    for s in [a, b] {
        s.set_read_timeout(t).unwrap();
    }
    std::thread::scope(|sc| {
        let dst = sc.spawn(move || {
            let r = Conn::handshake(b, Side::Destination, kd);
            if r.is_err() {
                // A refusing destination hangs up, as the real one does on exit.
                let _ = b.shutdown(std::net::Shutdown::Both);
            }
            r
        });
        let src = Conn::handshake(a, Side::Source, ks);
        if src.is_err() {
            let _ = a.shutdown(std::net::Shutdown::Both);
        }
        (src, dst.join().unwrap())
    })
}

/// One raw frame as it arrives at `b`.
fn raw_frame(mut b: &UnixStream) -> Vec<u8> {
    let mut prefix = [0u8; 4];
    b.read_exact(&mut prefix).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(prefix) as usize];
    b.read_exact(&mut body).unwrap();
    [prefix.to_vec(), body].concat()
}

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

#[test]
fn keyed_frames_round_trip_and_are_encrypted() {
    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(&a, &b, Some(KEY), Some(KEY));
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    assert!(src.authenticated() && dst.authenticated());
    src.send_parts(Kind::Pages, &[&7u64.to_le_bytes(), b"secret page"])
        .unwrap();
    let raw = raw_frame(&b);
    assert!(!raw.windows(11).any(|w| w == b"secret page"), "encrypted");
    (&a).write_all(&raw).unwrap();
    let (kind, payload) = dst.recv().unwrap();
    assert_eq!(kind, Kind::Pages);
    assert_eq!(&payload[8..], b"secret page");
    dst.send(Kind::Error, b"disk full").unwrap();
    assert!(src.recv().unwrap_err().contains("disk full"));
}

#[test]
fn corrupted_replayed_and_truncated_frames_are_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(&a, &b, Some(KEY), Some(KEY));
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    src.send(Kind::State, b"one").unwrap();
    let first = raw_frame(&b);
    // Replayed: the first copy is accepted, the second fails (its counter is used up).
    (&a).write_all(&first).unwrap();
    (&a).write_all(&first).unwrap();
    assert_eq!(dst.recv().unwrap().1, b"one");
    assert!(dst.recv().unwrap_err().contains("authentication"));

    // Corrupted: any flipped bit in the body or the length is caught.
    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(&a, &b, Some(KEY), Some(KEY));
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    src.send(Kind::State, b"two").unwrap();
    let mut bad = raw_frame(&b);
    bad[6] ^= 1;
    (&a).write_all(&bad).unwrap();
    assert!(dst.recv().unwrap_err().contains("authentication"));

    // Truncated: the peer hangs up mid-frame.
    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(&a, &b, Some(KEY), Some(KEY));
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    src.send(Kind::State, b"three").unwrap();
    let whole = raw_frame(&b);
    (&a).write_all(&whole[..whole.len() - 3]).unwrap();
    a.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(dst.recv().unwrap_err().contains("closed the connection"));
}

#[test]
fn oversized_and_unknown_frames_are_refused_unread() {
    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(&a, &b, None, None);
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    assert!(!src.authenticated());
    (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(dst.recv().unwrap_err().contains("outside"));
    (&a).write_all(&[1, 0, 0, 0, 99]).unwrap();
    assert!(dst.recv().unwrap_err().contains("unknown kind 99"));
    let big = vec![0u8; MAX_BODY];
    assert!(src.send(Kind::Pages, &big).unwrap_err().contains("exceeds"));
}

#[test]
fn wrong_or_missing_keys_are_refused_on_both_sides() {
    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(
        &a,
        &b,
        Some(KEY),
        Some(b"another key, of the same length.."),
    );
    let (src, dst) = (src.err().unwrap(), dst.err().unwrap());
    assert!(src.contains("keys differ"), "{src}");
    assert!(dst.contains("keys differ"), "{dst}");

    let (a, b) = UnixStream::pair().unwrap();
    let (src, dst) = shake(&a, &b, None, Some(KEY));
    assert!(src.err().unwrap().contains("requires a pre-shared key"));
    assert!(dst.err().unwrap().contains("peer has none"));

    let (a, b) = UnixStream::pair().unwrap();
    (&a).write_all(b"GET / HTTP/1.1\r\n\r\n......................")
        .unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = Conn::handshake(&b, Side::Destination, None).err().unwrap();
    assert!(err.contains("wrong greeting"), "{err}");
}

#[test]
fn the_rate_cap_holds() {
    let (a, b) = UnixStream::pair().unwrap();
    let (src, _dst) = shake(&a, &b, None, None);
    let mut src = src.unwrap();
    let b = b.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = (&b).read_to_end(&mut sink);
        sink.len()
    });
    src.limit_rate(4 << 20);
    let t = Instant::now();
    let page = vec![1u8; 64 << 10];
    for _ in 0..16 {
        src.send(Kind::Pages, &page).unwrap();
    }
    // 1 MiB at 4 MiB/s: at least about a quarter second.
    assert!(
        t.elapsed() >= Duration::from_millis(240),
        "{:?}",
        t.elapsed()
    );
    drop(src);
    a.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(reader.join().unwrap() >= 1 << 20);
}
