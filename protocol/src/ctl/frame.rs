//! The operator protocol's frames: [`CtlMessage`], framed as migration
//! messages are ([`crate::message`]: length prefix, tag, postcard body)
//! under tags of its own, which no migration message takes. An agent's
//! operator server decodes only these, and its migration peers' decoder
//! refuses them.

use crate::message::{decode_whole, encode_tagged, split_tag, DecodeError, EncodeError};

use super::{CtlRequest, CtlResponse};

/// Operator protocol tags: the first byte of a frame.
pub mod tag {
    /// [`super::CtlMessage::Request`].
    pub const REQUEST: u8 = 32;
    /// [`super::CtlMessage::Response`].
    pub const RESPONSE: u8 = 33;
}

/// A frame of the operator protocol.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // One request per stream, moved once; a response, far larger, is boxed.
pub enum CtlMessage {
    /// Operator → agent, tag 32.
    Request(CtlRequest),
    /// Agent → operator, tag 33.
    Response(Box<CtlResponse>),
}

impl CtlMessage {
    /// The frame's tag.
    pub fn tag(&self) -> u8 {
        match self {
            CtlMessage::Request(_) => tag::REQUEST,
            CtlMessage::Response(_) => tag::RESPONSE,
        }
    }

    /// A short name for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CtlMessage::Request(_) => "CtlRequest",
            CtlMessage::Response(_) => "CtlResponse",
        }
    }

    /// The whole frame: length prefix, tag, body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        match self {
            CtlMessage::Request(r) => encode_tagged(self.tag(), r),
            CtlMessage::Response(r) => encode_tagged(self.tag(), r.as_ref()),
        }
    }

    /// Decodes one frame's tag and body (the length prefix already
    /// removed); any other tag, a migration message's included, is
    /// [`DecodeError::UnknownTag`].
    pub fn decode(frame: &[u8]) -> Result<CtlMessage, DecodeError> {
        let (t, body) = split_tag(frame)?;
        Ok(match t {
            crate::message::tag::INVALID => return Err(DecodeError::InvalidTag),
            tag::REQUEST => {
                // A request of a newer convoyctl is named as such, not as
                // malformed bytes.
                if let Some(variant) = leading_varint(body).filter(|v| *v >= REQUEST_VARIANTS) {
                    return Err(DecodeError::UnknownVariant {
                        message: "CtlRequest",
                        variant,
                    });
                }
                CtlMessage::Request(decode_whole("CtlRequest", body)?)
            }
            tag::RESPONSE => CtlMessage::Response(Box::new(decode_whole("CtlResponse", body)?)),
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

/// How many variants [`CtlRequest`] has (its last one's index plus one;
/// `request_variants_are_counted` keeps this in step).
const REQUEST_VARIANTS: u32 = 14;

/// The postcard varint (an enum's variant index) `body` starts with.
fn leading_varint(body: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    for (i, b) in body.iter().take(5).enumerate() {
        v |= u32::from(b & 0x7f).checked_shl(7 * u32::try_from(i).ok()?)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::LEN_PREFIX;
    use crate::message::{Message, RoundApplied};

    fn request() -> CtlRequest {
        CtlRequest::AuditRead { offset: 300 }
    }

    /// The frame as `Message::CtlRequest` encoded it before the operator
    /// protocol had a type of its own: prefix, tag 32, postcard body.
    #[test]
    fn frames_are_as_they_were() {
        let body = postcard::to_stdvec(&request()).unwrap();
        let mut want = u32::try_from(body.len() + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        want.push(32);
        want.extend_from_slice(&body);
        let frame = CtlMessage::Request(request()).encode().unwrap();
        assert_eq!(frame, want);
        assert_eq!(
            CtlMessage::decode(&frame[LEN_PREFIX..]).unwrap(),
            CtlMessage::Request(request())
        );
        let response = CtlMessage::Response(Box::new(CtlResponse::VmList(Vec::new())));
        let frame = response.encode().unwrap();
        assert_eq!(frame[LEN_PREFIX], 33);
        assert_eq!(CtlMessage::decode(&frame[LEN_PREFIX..]).unwrap(), response);
    }

    #[test]
    fn each_decoder_refuses_the_others_frames() {
        let ctl = CtlMessage::Request(request()).encode().unwrap();
        assert_eq!(
            Message::decode(Bytes::from(ctl).slice(LEN_PREFIX..)),
            Err(DecodeError::UnknownTag(32))
        );
        let migration = Message::RoundApplied(RoundApplied { round: 1 })
            .encode()
            .unwrap();
        assert_eq!(
            CtlMessage::decode(&migration[LEN_PREFIX..]),
            Err(DecodeError::UnknownTag(15))
        );
        assert_eq!(CtlMessage::decode(&[0]), Err(DecodeError::InvalidTag));
        assert!(matches!(
            CtlMessage::decode(&[32, 0xff]),
            Err(DecodeError::Malformed {
                message: "CtlRequest",
                ..
            })
        ));
        assert!(matches!(
            CtlMessage::decode(&[33, 2, 0, 7]),
            Err(DecodeError::Trailing {
                message: "CtlResponse",
                extra: 1
            })
        ));
    }

    /// Every request, by its index on the wire: a variant added breaks
    /// this match until it is counted.
    fn index(r: &CtlRequest) -> u32 {
        match r {
            CtlRequest::Status => 0,
            CtlRequest::VmCreate(_) => 1,
            CtlRequest::VmList => 2,
            CtlRequest::Migrate(_) => 3,
            CtlRequest::VmDelete(_) => 4,
            CtlRequest::Abort(_) => 5,
            CtlRequest::AuditRead { .. } => 6,
            CtlRequest::VmCreateQemu(_) => 7,
            CtlRequest::VmPause(..) => 8,
            CtlRequest::VmAdoptQemu(..) => 9,
            CtlRequest::Recover { .. } => 10,
            CtlRequest::Snapshot(_) => 11,
            CtlRequest::Fleet(_) => 12,
            CtlRequest::Admission(_) => 13,
        }
    }

    #[test]
    fn request_variants_are_counted() {
        let vm: crate::names::VmName = "vm".parse().unwrap();
        for r in [
            CtlRequest::Status,
            CtlRequest::VmList,
            CtlRequest::VmDelete(vm.clone()),
            CtlRequest::Abort(vm.clone()),
            CtlRequest::AuditRead { offset: 1 },
            CtlRequest::VmPause(vm, true),
            CtlRequest::Recover {
                vm: None,
                force_resume_here: true,
            },
        ] {
            let body = postcard::to_stdvec(&r).unwrap();
            assert_eq!(leading_varint(&body), Some(index(&r)), "{r:?}");
        }
        let snapshot = CtlRequest::Snapshot(super::super::snapshot::SnapshotRequest::List {
            url: "file:///x".into(),
        });
        let body = postcard::to_stdvec(&snapshot).unwrap();
        assert_eq!(leading_varint(&body), Some(index(&snapshot)));
        let fleet = CtlRequest::Fleet(super::super::fleet::FleetQuery::default());
        let body = postcard::to_stdvec(&fleet).unwrap();
        assert_eq!(leading_varint(&body), Some(index(&fleet)));
        let last = CtlRequest::Admission(Box::new(super::super::admission::AdmissionQuery {
            ticket: crate::signed::Signed::from_parts(vec![1], vec![2], vec![]),
            attributes: Default::default(),
            memory_bytes: 4096,
        }));
        let body = postcard::to_stdvec(&last).unwrap();
        assert_eq!(leading_varint(&body), Some(index(&last)));
        assert_eq!(index(&last) + 1, REQUEST_VARIANTS);
    }

    /// A request frame: tag and `body`.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag::REQUEST];
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn a_newer_request_and_an_invalid_name_are_named_readably() {
        // The variant after the last and a far larger one, as a newer
        // convoyctl sends.
        let next = u8::try_from(REQUEST_VARIANTS).unwrap();
        for body in [vec![next], vec![0x80, 0x01, 0]] {
            let e = CtlMessage::decode(&frame(&body)).unwrap_err();
            assert!(
                matches!(
                    e,
                    DecodeError::UnknownVariant {
                        message: "CtlRequest",
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("newer"), "{e}");
        }
        // `vm delete ..`: the name's own rule, not postcard's "Serde
        // Deserialization Error".
        let e = CtlMessage::decode(&frame(&[4, 2, b'.', b'.'])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed CtlRequest: invalid VM name \"..\": must not start with '.'"
        );
        // A valid frame after a refused one carries no stale reason.
        let ok = CtlMessage::encode(&CtlMessage::Request(CtlRequest::VmList)).unwrap();
        assert!(CtlMessage::decode(&ok[LEN_PREFIX..]).is_ok());
        let e = CtlMessage::decode(&frame(&[4, 1])).unwrap_err();
        assert!(!e.to_string().contains("must not start"), "{e}");
    }
}
