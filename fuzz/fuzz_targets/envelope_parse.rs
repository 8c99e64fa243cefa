//! `ENC[...]` values and `keystore:file` records from a secrets file the
//! host hands over: every byte is hostile. Parsing must return a typed
//! error, never panic; whatever parses must print back to itself; a record
//! that decodes must encode back to the same bytes (one encoding per
//! record), and checking its MAC or manifest must not panic either.
#![no_main]

use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::{FileKey, FileRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(envelope) = Envelope::parse(text)
    {
        assert_eq!(Envelope::parse(&envelope.to_string()).as_ref(), Ok(&envelope));
    }
    if let Ok(record) = FileRecord::decode(data) {
        assert_eq!(record.encode(), data);
        if let Ok(key) = FileKey::derive(&[0; 32], record.file_id) {
            let _ = key.verify(&record);
        }
        let none: [(&str, &Envelope); 0] = [];
        let _ = record.check_entries(none);
    }
});
