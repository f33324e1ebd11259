//! Classifying a connection from the first bytes the client sent.
//!
//! Pure functions over a byte prefix, so the async detection loop (`detect.rs`) can call them
//! after every read, however the bytes were split across reads.

use tls_parser::{
    TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType, parse_tls_extensions,
    parse_tls_message_handshake, parse_tls_raw_record,
};

use crate::{http2::H2_PREFACE, state::ClientHello};

/// Largest client prefix buffered while deciding: a TLS record carries at most 16 KiB.
pub const MAX_SNIFF_BYTES: usize = 5 + 16 * 1024;

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Consistent with a known protocol but not complete yet.
    NeedMore,
    H2,
    Tls(ClientHello),
    Opaque,
}

pub fn sniff(prefix: &[u8]) -> Sniffed {
    if prefix.is_empty() {
        return Sniffed::NeedMore;
    }
    if prefix[0] == H2_PREFACE[0] {
        let n = prefix.len().min(H2_PREFACE.len());
        return match (prefix[..n] == H2_PREFACE[..n], n == H2_PREFACE.len()) {
            (true, true) => Sniffed::H2,
            (true, false) => Sniffed::NeedMore,
            (false, _) => Sniffed::Opaque,
        };
    }
    if prefix[0] == 0x16 {
        return sniff_tls(prefix);
    }
    Sniffed::Opaque
}

/// A TLS handshake record: type 0x16, version 0x03 0x0?, then the ClientHello. The hello may
/// be fragmented over several records (RFC 8446 §5.1), so the handshake message is
/// reassembled from consecutive records before it is parsed.
fn sniff_tls(prefix: &[u8]) -> Sniffed {
    if prefix.len() >= 2 && prefix[1] != 0x03 {
        return Sniffed::Opaque;
    }
    if prefix.len() >= 6 && prefix[5] != 0x01 {
        return Sniffed::Opaque; // a handshake record, but not a ClientHello
    }
    let need_more = if prefix.len() < MAX_SNIFF_BYTES {
        Sniffed::NeedMore
    } else {
        Sniffed::Opaque
    };
    let mut message = Vec::new();
    let mut rest = prefix;
    let whole = loop {
        let record = match parse_tls_raw_record(rest) {
            Ok((after, record)) => {
                rest = after;
                record
            }
            Err(tls_parser::nom::Err::Incomplete(_)) => return need_more,
            Err(_) => return Sniffed::Opaque,
        };
        // Only handshake records may carry the hello's fragments, and an empty one is not
        // allowed (it would let a peer feed us records forever).
        if record.hdr.record_type != TlsRecordType::Handshake || record.data.is_empty() {
            return Sniffed::Opaque;
        }
        message.extend_from_slice(record.data);
        if message.len() >= 4 {
            let length = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            if message.len() >= 4 + length {
                break &message[..4 + length];
            }
            if 4 + length > MAX_SNIFF_BYTES {
                return Sniffed::Opaque; // more than we are willing to buffer
            }
        }
    };
    match parse_tls_message_handshake(whole) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => {
            Sniffed::Tls(client_hello_details(hello.ext))
        }
        _ => Sniffed::Opaque,
    }
}

fn client_hello_details(extensions: Option<&[u8]>) -> ClientHello {
    let mut details = ClientHello::default();
    let Some(Ok((_, extensions))) = extensions.map(parse_tls_extensions) else {
        return details;
    };
    for extension in extensions {
        match extension {
            TlsExtension::SNI(names) => {
                details.sni = names
                    .iter()
                    .find(|(kind, _)| kind.0 == 0)
                    .and_then(|(_, name)| std::str::from_utf8(name).ok())
                    .map(str::to_owned);
            }
            TlsExtension::ALPN(protocols) => {
                details.alpn = protocols
                    .iter()
                    .filter_map(|p| std::str::from_utf8(p).ok().map(str::to_owned))
                    .collect();
            }
            _ => {}
        }
    }
    details
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A ClientHello as `openssl s_client -servername greeter.test -alpn h2,http/1.1` sends it
    /// (trimmed to the extensions that matter here).
    pub(crate) fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut ext = Vec::new();
        // server_name
        let name = sni.as_bytes();
        let mut list = vec![0u8];
        list.extend((name.len() as u16).to_be_bytes());
        list.extend(name);
        let mut sni_body = (list.len() as u16).to_be_bytes().to_vec();
        sni_body.extend(list);
        ext.extend(0u16.to_be_bytes());
        ext.extend((sni_body.len() as u16).to_be_bytes());
        ext.extend(sni_body);
        // application_layer_protocol_negotiation
        let mut protos = Vec::new();
        for p in alpn {
            protos.push(p.len() as u8);
            protos.extend(p.as_bytes());
        }
        let mut alpn_body = (protos.len() as u16).to_be_bytes().to_vec();
        alpn_body.extend(protos);
        ext.extend(16u16.to_be_bytes());
        ext.extend((alpn_body.len() as u16).to_be_bytes());
        ext.extend(alpn_body);

        let mut hello = vec![0x03, 0x03];
        hello.extend([7u8; 32]); // random
        hello.push(0); // session id
        hello.extend(2u16.to_be_bytes());
        hello.extend([0x13, 0x01]); // TLS_AES_128_GCM_SHA256
        hello.extend([1, 0]); // compression: null
        hello.extend((ext.len() as u16).to_be_bytes());
        hello.extend(ext);

        let mut handshake = vec![0x01];
        handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend(hello);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }

    #[test]
    fn h2_preface_needs_all_24_bytes() {
        for n in 1..H2_PREFACE.len() {
            assert_eq!(sniff(&H2_PREFACE[..n]), Sniffed::NeedMore, "{n} bytes");
        }
        assert_eq!(sniff(H2_PREFACE), Sniffed::H2);
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(sniff(&with_settings), Sniffed::H2);
    }

    #[test]
    fn http1_and_near_misses_are_opaque() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"PUT"), Sniffed::Opaque);
        assert_eq!(sniff(b"\x16\x02"), Sniffed::Opaque);
        assert_eq!(sniff(b"\x16\x03\x01\x00\x10\x02"), Sniffed::Opaque); // ServerHello
    }

    #[test]
    fn client_hello_gives_sni_and_alpn() {
        let hello = client_hello("greeter.test", &["h2", "http/1.1"]);
        let expected = ClientHello {
            sni: Some("greeter.test".into()),
            alpn: vec!["h2".into(), "http/1.1".into()],
        };
        assert_eq!(sniff(&hello), Sniffed::Tls(expected));
    }

    /// The hello's handshake message split over `records` records at the given offsets.
    fn fragmented(hello: &[u8], cuts: &[usize]) -> Vec<u8> {
        let message = &hello[5..];
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().map(|&c| c.min(message.len())));
        bounds.push(message.len());
        bounds.sort_unstable();
        bounds.dedup();
        let mut bytes = Vec::new();
        for piece in bounds.windows(2) {
            let fragment = &message[piece[0]..piece[1]];
            bytes.extend([0x16, 0x03, 0x01]);
            bytes.extend((fragment.len() as u16).to_be_bytes());
            bytes.extend(fragment);
        }
        bytes
    }

    #[test]
    fn a_client_hello_over_several_records_is_reassembled() {
        let hello = client_hello("frag.test", &["h2"]);
        for cuts in [&[1][..], &[3], &[4], &[20, 21, 60]] {
            let bytes = fragmented(&hello, cuts);
            let Sniffed::Tls(seen) = sniff(&bytes) else {
                panic!("cuts {cuts:?}: {:?}", sniff(&bytes));
            };
            assert_eq!(seen.sni.as_deref(), Some("frag.test"));
            for n in 1..bytes.len() {
                assert_eq!(
                    sniff(&bytes[..n]),
                    Sniffed::NeedMore,
                    "cuts {cuts:?}, {n} bytes"
                );
            }
        }
        // An application-data record in the middle is not a hello.
        let mut bytes = fragmented(&hello, &[10]);
        let second = 5 + 10;
        bytes[second] = 0x17;
        assert_eq!(sniff(&bytes), Sniffed::Opaque);
    }

    #[test]
    fn a_cut_client_hello_asks_for_more() {
        let hello = client_hello("greeter.test", &["h2"]);
        for n in 1..hello.len() {
            assert_eq!(
                sniff(&hello[..n]),
                Sniffed::NeedMore,
                "{n} of {} bytes",
                hello.len()
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = sniff(&bytes);
        }

        #[test]
        fn tls_looking_garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let mut bytes = vec![0x16, 0x03, 0x01];
            bytes.extend(tail);
            let _ = sniff(&bytes);
        }

        /// However a ClientHello is fragmented over records and wherever the bytes stop,
        /// every prefix is undecided and the whole gives the SNI.
        #[test]
        fn fragmented_client_hellos(
            cuts in proptest::collection::vec(0usize..120, 0..4),
            stop in any::<proptest::sample::Index>(),
        ) {
            let bytes = fragmented(&client_hello("p.test", &["h2"]), &cuts);
            let whole = sniff(&bytes);
            prop_assert!(
                matches!(&whole, Sniffed::Tls(h) if h.sni.as_deref() == Some("p.test")),
                "{:?}", whole
            );
            let n = stop.index(bytes.len()).max(1);
            prop_assert_eq!(sniff(&bytes[..n]), Sniffed::NeedMore);
        }

        /// However a ClientHello is split across reads, every prefix is undecided and the
        /// whole is recognised; corrupting a byte never panics.
        #[test]
        fn client_hello_prefixes(cut in 0usize..200, flip in 0usize..200, value in any::<u8>()) {
            let hello = client_hello("a.example", &["h2"]);
            let cut = cut % hello.len();
            prop_assert_eq!(sniff(&hello[..cut.max(1)]), Sniffed::NeedMore);
            prop_assert!(matches!(sniff(&hello), Sniffed::Tls(_)));
            let mut corrupt = hello.clone();
            corrupt[flip % hello.len()] = value;
            let _ = sniff(&corrupt);
        }
    }
}
