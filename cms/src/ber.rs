//! A nesting-depth pre-check over BER, run before the schema decoder.
//!
//! The `der` crate already refuses nesting beyond its own internal limit, but
//! that limit is an implementation detail of a dependency and far deeper than
//! anything KMS sends. Walking the TLV tree once with an explicit bound makes
//! the guarantee ours: hostile input cannot drive deep recursion or repeated
//! indefinite-length rescans, whatever the decoder does internally.

use der::{Decode, EncodingRules, Header, Reader, SliceReader};

use super::CmsError;

/// Fails with [`CmsError::TooDeep`] if any constructed value in `blob` sits
/// more than `max_depth` levels deep (the outermost value is level 1), and
/// with [`CmsError::Malformed`] if the TLV framing itself is broken.
pub(super) fn check_depth(blob: &[u8], max_depth: usize) -> Result<(), CmsError> {
    let mut reader = SliceReader::new_with_encoding_rules(blob, EncodingRules::Ber)?;
    walk(&mut reader, 1, max_depth)?;
    Ok(reader.finish()?)
}

/// Visits the TLVs of one level. An indefinite-length value's nested reader
/// includes its end-of-contents marker, which is consumed here as the
/// (zero-tag, zero-length) element it is encoded as.
fn walk(reader: &mut SliceReader<'_>, depth: usize, max_depth: usize) -> Result<(), CmsError> {
    if depth > max_depth && !reader.is_finished() {
        return Err(CmsError::TooDeep { max: max_depth });
    }
    while !reader.is_finished() {
        if reader.peek_byte() == Some(0) {
            // End-of-contents: `00 00`. Anything else starting with a zero
            // tag byte is not valid BER.
            if reader.read_slice(2u8.into())? != [0, 0] {
                return Err(der::Error::from(der::ErrorKind::IndefiniteLength).into());
            }
            continue;
        }
        let header = Header::decode(reader)?;
        if header.is_constructed() {
            reader.read_nested(header.length(), |nested| walk(nested, depth + 1, max_depth))?;
        } else {
            reader.read_slice(header.length())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_indefinite(levels: usize) -> Vec<u8> {
        let mut blob = Vec::new();
        for _ in 0..levels {
            blob.extend_from_slice(&[0x30, 0x80]);
        }
        blob.extend_from_slice(&[0x05, 0x00]);
        for _ in 0..levels {
            blob.extend_from_slice(&[0x00, 0x00]);
        }
        blob
    }

    fn nested_definite(levels: usize) -> Vec<u8> {
        let mut blob = vec![0x05, 0x00];
        for _ in 0..levels {
            let len = u8::try_from(blob.len()).expect("test sizes stay short");
            let mut outer = vec![0x30, len];
            outer.extend_from_slice(&blob);
            blob = outer;
        }
        blob
    }

    #[test]
    fn accepts_up_to_the_limit() {
        // The NULL is one level below the innermost SEQUENCE.
        assert!(check_depth(&nested_indefinite(3), 4).is_ok());
        assert!(check_depth(&nested_definite(3), 4).is_ok());
    }

    #[test]
    fn refuses_beyond_the_limit() {
        assert!(matches!(
            check_depth(&nested_indefinite(4), 4),
            Err(CmsError::TooDeep { max: 4 })
        ));
        assert!(matches!(
            check_depth(&nested_definite(4), 4),
            Err(CmsError::TooDeep { max: 4 })
        ));
    }

    #[test]
    fn deep_hostile_nesting_is_an_error_not_a_crash() {
        assert!(check_depth(&nested_indefinite(10_000), 16).is_err());
    }

    #[test]
    fn broken_framing_is_malformed() {
        assert!(matches!(
            check_depth(&[0x30, 0x05, 0x05, 0x00], 16),
            Err(CmsError::Malformed(_))
        ));
        assert!(matches!(
            check_depth(&[0x30, 0x80, 0x05, 0x00, 0x00, 0x01], 16),
            Err(CmsError::Malformed(_))
        ));
    }
}
