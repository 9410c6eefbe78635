//! Fuzz entry points: plain functions over arbitrary bytes that panic only
//! on a broken invariant. `tests/fuzz` drives them coverage-guided (cargo
//! fuzz, nightly); `cargo test` replays the committed corpus through them.

use crate::{read_frame, Decoder, ProtocolError, MAX_FRAME};

/// A byte stream from the peer, as either side reads it: through the
/// blocking [`read_frame`] (the host's event thread, the agent's control
/// loop) and through [`Decoder`] fed in pieces. Both must agree frame by
/// frame, hold at most one frame's bytes, and every frame decoded must
/// encode back to itself.
pub fn frames(data: &[u8]) {
    let mut blocking = Vec::new();
    let mut r = data;
    // Stops where the stream ends or is poisoned.
    while let Ok(Some(frame)) = read_frame(&mut r) {
        let poisoned = matches!(frame, Err(ProtocolError::FrameTooLarge(_)));
        blocking.push(frame);
        if poisoned {
            break;
        }
    }

    // Piece sizes from the first byte: 1 to 256 bytes at a time.
    let step = data.first().map_or(1, |&b| usize::from(b) + 1);
    let mut decoder = Decoder::new();
    let mut streamed = Vec::new();
    'feed: for piece in data.chunks(step) {
        decoder.push(piece);
        assert!(decoder.buffered() <= 4 + MAX_FRAME + step);
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => streamed.push(Ok(f)),
                Ok(None) => break,
                Err(e) => {
                    let poisoned = matches!(e, ProtocolError::FrameTooLarge(_));
                    streamed.push(Err(e));
                    if poisoned {
                        break 'feed;
                    }
                }
            }
        }
    }
    assert_eq!(blocking, streamed, "read_frame and Decoder disagree");

    for frame in blocking.into_iter().flatten() {
        let bytes = frame.encode();
        let mut r = &bytes[..];
        match read_frame(&mut r) {
            Ok(Some(Ok(again))) => assert_eq!(again, frame, "re-encoding changed the frame"),
            other => panic!("a decoded frame does not decode again: {other:?}"),
        }
    }
}
