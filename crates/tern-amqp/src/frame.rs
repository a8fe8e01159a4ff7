//! Frames on the wire: cutting complete frames out of the read buffer (with
//! the frame-max check) and serialising frames, both through `amq-protocol`'s
//! codec; plus the helpers that build a message's method, header and body
//! frames.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{AMQPClass, BasicProperties};
use amq_protocol::types::ShortString;
use bytes::BytesMut;

use crate::error::{code, AmqpError, ProtocolError};

/// The protocol header of AMQP 0-9-1, which the client sends first and the
/// server sends back when it does not like the client's.
pub(crate) const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Bytes a frame carries besides its payload: type, channel, size, frame end.
pub(crate) const FRAME_OVERHEAD: usize = 8;

/// The class id of `basic`, the only class with content.
pub(crate) const BASIC_CLASS: u16 = 60;

const FRAME_END: u8 = 0xCE;

/// Cuts the next complete frame out of `buf`, or returns `None` if more
/// bytes are needed. A frame larger than `frame_max` is refused (501) as soon
/// as its size is known, without waiting for its payload.
pub(crate) fn take_frame(
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<Option<AMQPFrame>, ProtocolError> {
    let Some(head) = buf.get(..7) else {
        return Ok(None);
    };
    let kind = head[0];
    if !matches!(kind, 1 | 2 | 3 | 8) {
        return Err(ProtocolError::new(
            code::FRAME_ERROR,
            format!("unknown frame type {kind}"),
        ));
    }
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let total = size.saturating_add(FRAME_OVERHEAD);
    if frame_max != 0 && total > frame_max as usize {
        return Err(ProtocolError::new(
            code::FRAME_ERROR,
            format!("frame of {total} bytes exceeds frame_max {frame_max}"),
        ));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let bytes = buf.split_to(total);
    if bytes.last() != Some(&FRAME_END) {
        return Err(ProtocolError::new(
            code::FRAME_ERROR,
            "frame does not end with frame-end",
        ));
    }
    match parse_frame(&bytes[..]) {
        Ok(([], frame)) => Ok(Some(frame)),
        _ => Err(ProtocolError::new(
            code::SYNTAX_ERROR,
            format!("malformed frame of type {kind}"),
        )),
    }
}

/// Appends one serialised frame to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), AmqpError> {
    let ctx = gen_frame(frame)(WriteContext::from(std::mem::take(out)))
        .map_err(|e| AmqpError::Encode(e.to_string()))?;
    *out = ctx.write;
    Ok(())
}

/// Serialises one method frame.
pub(crate) fn method(channel: u16, method: AMQPClass) -> Result<Vec<u8>, AmqpError> {
    let mut out = Vec::new();
    encode(&mut out, &AMQPFrame::Method(channel, method))?;
    Ok(out)
}

/// Serialises a method that carries content, its header frame and its body
/// frames, the body cut into pieces that fit `frame_max`.
pub(crate) fn content(
    channel: u16,
    method: AMQPClass,
    properties: BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> Result<Vec<u8>, AmqpError> {
    let mut out = Vec::new();
    content_into(&mut out, channel, method, properties, body, frame_max)?;
    Ok(out)
}

/// Appends what [`content`] serialises to `out`.
pub(crate) fn content_into(
    out: &mut Vec<u8>,
    channel: u16,
    method: AMQPClass,
    properties: BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), AmqpError> {
    out.reserve(body.len() + 256);
    encode(out, &AMQPFrame::Method(channel, method))?;
    encode(
        out,
        &AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: BASIC_CLASS,
                body_size: body.len() as u64,
                properties,
            },
        ),
    )?;
    let piece = if frame_max == 0 {
        body.len().max(1)
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
    };
    for chunk in body.chunks(piece) {
        body_frame(out, channel, chunk);
    }
    Ok(())
}

/// Appends one body frame. Written by hand rather than through the codec,
/// whose `AMQPFrame::Body` owns a `Vec`: that would cost every delivery an
/// allocation and a second copy of its body. `chunk` is at most frame-max
/// less the overhead, so its length fits the frame's `u32` size.
fn body_frame(out: &mut Vec<u8>, channel: u16, chunk: &[u8]) {
    out.reserve(chunk.len() + FRAME_OVERHEAD);
    out.push(3);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
    out.extend_from_slice(chunk);
    out.push(FRAME_END);
}

/// A short string from any text, cut at 255 bytes (on a character boundary)
/// so that building it never fails.
pub(crate) fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&s[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic;

    /// The hand-written body frames are what the codec would have written:
    /// the codec parses the whole message back, body cut at frame-max.
    #[test]
    fn content_parses_back_with_the_body_cut_at_frame_max() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: short("c"),
            delivery_tag: 7,
            redelivered: false,
            exchange: short(""),
            routing_key: short("q"),
        }));
        let out = content(5, method.clone(), BasicProperties::default(), &body, 4096)
            .expect("serialises");
        let mut buf = BytesMut::from(&out[..]);
        let mut frames = Vec::new();
        while let Some(frame) = take_frame(&mut buf, 4096).expect("well-formed") {
            frames.push(frame);
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 2 + 3, "method, header, three body frames");
        assert!(matches!(&frames[0], AMQPFrame::Method(5, m) if *m == method));
        assert!(matches!(&frames[1], AMQPFrame::Header(5, h) if h.body_size == 10_000));
        let mut received = Vec::new();
        for frame in &frames[2..] {
            let AMQPFrame::Body(5, piece) = frame else {
                panic!("expected a body frame on channel 5, got {frame:?}");
            };
            assert!(piece.len() + FRAME_OVERHEAD <= 4096);
            received.extend_from_slice(piece);
        }
        assert_eq!(received, body);
    }
}
