//! Local control frames: a big-endian u32 length, then that many bytes of JSON.

use std::io::{Read, Write};

use serde::Serialize;

/// Largest frame accepted; requests and replies are small (bytes travel by mapping).
pub const MAX_FRAME: usize = 16 << 20;

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, value: &impl Serialize) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream (before a frame's
/// first byte). A stream that ends inside a frame is an `UnexpectedEof`
/// error saying where ([`length_cut_short`], [`body_cut_short`]).
pub fn read_frame<R: Read>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        n => return Err(length_cut_short(n)),
    }
    let len = u32::from_be_bytes(len) as usize;
    check_frame_len(len)?;
    let mut body = vec![0u8; len];
    let n = read_full(r, &mut body)?;
    if n < len {
        return Err(body_cut_short(n, len));
    }
    Ok(Some(body))
}

/// Reads until `buf` is full or the stream ends: the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The error for a stream that ended `read` bytes (1 to 3) into a frame's
/// length.
pub fn length_cut_short(read: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("the stream ended {read} bytes into a frame's 4-byte length"),
    )
}

/// The error for a stream that ended after `read` of a frame's `len` bytes.
pub fn body_cut_short(read: usize, len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("the stream ended after {read} of a frame's {len} bytes"),
    )
}

/// An `InvalidData` error if a frame of `len` bytes exceeds [`MAX_FRAME`].
pub fn check_frame_len(len: usize) -> std::io::Result<()> {
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        read_frame(&mut std::io::Cursor::new(bytes))
    }

    #[test]
    fn frames_cut_short_are_named() {
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(read(&[0, 0, 0, 2, b'{', b'}']).unwrap(), Some(b"{}".to_vec()));
        for cut in 1..4 {
            let e = read(&[0, 0, 0, 2][..cut]).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
            assert!(e.to_string().contains(&format!("{cut} bytes into a frame's 4-byte length")), "{e}");
        }
        let e = read(&[0, 0, 0, 9, b'{', b'"']).unwrap_err();
        assert!(e.to_string().contains("after 2 of a frame's 9 bytes"), "{e}");
        let e = read(&[0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(e.to_string().contains("4294967295 bytes exceeds"), "{e}");
    }
}
