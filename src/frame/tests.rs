use super::*;

const MAX: u64 = 1 << 20;
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame as a peer writes it: masked with `KEY` when `masked`.
fn wire(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, fin, opcode, payload, masked.then_some(KEY));
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A data frame reassembled from its pieces, unmasked: kind, first, fin, payload.
    Data(Kind, bool, bool, Vec<u8>),
    Control(Control, Vec<u8>),
}

/// Feeds `input` to a reader in pieces of `split` bytes and collects what it reports.
fn read_all(input: &[u8], split: usize, from_client: bool) -> Result<Vec<Seen>, Violation> {
    let mut reader = FrameReader::new(from_client, MAX);
    let mut seen = Vec::new();
    let mut open: Option<(DataFrame, Vec<u8>)> = None;
    for chunk in input.chunks(split.max(1)) {
        let mut buf = chunk;
        while let Some(step) = reader.next(&mut buf)? {
            match step {
                Step::Data { frame, bytes, offset } => {
                    let (_, payload) = open.get_or_insert_with(|| (frame, Vec::new()));
                    assert_eq!(offset, payload.len() as u64, "pieces arrive in order");
                    let start = payload.len();
                    payload.extend_from_slice(bytes);
                    if let Some(key) = frame.mask {
                        apply_mask(&mut payload[start..], rotate(key, offset));
                    }
                    if offset + bytes.len() as u64 == frame.len {
                        let (frame, payload) = open.take().expect("opened above");
                        seen.push(Seen::Data(frame.kind, frame.first, frame.fin, payload));
                    }
                }
                Step::Control(op) => seen.push(Seen::Control(op, reader.control_payload().to_vec())),
            }
        }
        assert!(buf.is_empty(), "the reader uses every byte it is given");
    }
    Ok(seen)
}

#[test]
fn frames_read_the_same_however_the_bytes_are_split() {
    let big = (0..70_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
    let medium = vec![b'm'; 300];
    for masked in [true, false] {
        let input = [
            wire(true, OP_TEXT, b"hello", masked),
            wire(false, OP_BINARY, &big, masked),
            wire(true, OP_PING, b"ping!", masked),
            wire(false, OP_CONTINUATION, b"", masked),
            wire(true, OP_CONTINUATION, &medium, masked),
            wire(true, OP_TEXT, b"", masked),
            wire(true, OP_CLOSE, &[0x03, 0xe8, b'b', b'y', b'e'], masked),
        ]
        .concat();
        let expected = vec![
            Seen::Data(Kind::Text, true, true, b"hello".to_vec()),
            Seen::Data(Kind::Binary, true, false, big.clone()),
            Seen::Control(Control::Ping, b"ping!".to_vec()),
            Seen::Data(Kind::Binary, false, false, Vec::new()),
            Seen::Data(Kind::Binary, false, true, medium.clone()),
            Seen::Data(Kind::Text, true, true, Vec::new()),
            Seen::Control(Control::Close, vec![0x03, 0xe8, b'b', b'y', b'e']),
        ];
        for split in [1, 2, 3, 5, 13, 14, 15, 127, 4096, input.len()] {
            assert_eq!(read_all(&input, split, masked).unwrap(), expected, "split {split}, masked {masked}");
        }
    }
}

#[test]
fn every_length_encoding_round_trips() {
    for len in [0u64, 1, 125, 126, 127, 65_535, 65_536, 1 << 33] {
        for mask in [None, Some(KEY)] {
            let mut out = Vec::new();
            write_head(&mut out, true, OP_BINARY, len, mask);
            let (head, used) = Head::parse(&out).expect("a whole header");
            assert_eq!((head.len, head.mask, head.fin, head.opcode, used), (len, mask, true, OP_BINARY, out.len()));
            assert_eq!(Head::parse(&out[..out.len() - 1]), None, "one byte short is incomplete");
        }
    }
}

#[test]
fn protocol_violations_are_refused_with_1002() {
    let cases: &[(&str, Vec<u8>, bool)] = &[
        ("unmasked frame from a client", wire(true, OP_TEXT, b"hi", false), true),
        ("masked frame from a server", wire(true, OP_TEXT, b"hi", true), false),
        ("RSV1", [&[0xc1u8][..], &wire(true, OP_TEXT, b"hi", true)[1..]].concat(), true),
        ("reserved data opcode", wire(true, 0x3, b"", true), true),
        ("reserved control opcode", wire(true, 0xb, b"", true), true),
        ("fragmented ping", wire(false, OP_PING, b"p", true), true),
        ("126-byte ping", wire(true, OP_PING, &[0; 126], true), true),
        ("orphan continuation", wire(true, OP_CONTINUATION, b"x", true), true),
        // RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0 (a protocol
        // error, not a message too big), and a length takes the shortest form that holds it.
        ("64-bit length with the top bit set", [&[0x82u8, 127][..], &[0xff; 8]].concat(), false),
        ("64-bit length 2^63", [&[0x82u8, 127, 0x80][..], &[0; 7]].concat(), false),
        ("5 in 16 bits", [0x82u8, 126, 0, 5].to_vec(), false),
        ("125 in 16 bits", [0x82u8, 126, 0, 125].to_vec(), false),
        ("65535 in 64 bits", [&[0x82u8, 127][..], &[0, 0, 0, 0, 0, 0, 0xff, 0xff]].concat(), false),
        ("0 in 64 bits, on a ping", [&[0x89u8, 127][..], &[0; 8]].concat(), false),
        (
            "new message inside a fragmented one",
            [wire(false, OP_TEXT, b"a", true), wire(true, OP_TEXT, b"b", true)].concat(),
            true,
        ),
    ];
    for (what, input, from_client) in cases {
        let err = read_all(input, input.len(), *from_client).expect_err(what);
        assert_eq!(err.code, 1002, "{what}");
    }
    // The shortest forms at each boundary are fine.
    for len in [125usize, 126, 0xffff, 0x10000] {
        let frame = wire(true, OP_BINARY, &vec![0; len], false);
        assert!(read_all(&frame, frame.len(), false).is_ok(), "{len} bytes");
    }
}

#[test]
fn size_limit_counts_frames_and_whole_messages() {
    let mut reader = FrameReader::new(false, 10);
    let mut one = &wire(true, OP_BINARY, &[0; 11], false)[..];
    assert_eq!(reader.next(&mut one), Err(Violation::TOO_BIG));
    let mut reader = FrameReader::new(false, 10);
    let two = [wire(false, OP_TEXT, &[b'a'; 6], false), wire(true, OP_CONTINUATION, &[b'a'; 5], false)].concat();
    let mut buf = &two[..];
    assert!(matches!(reader.next(&mut buf), Ok(Some(Step::Data { .. }))));
    assert_eq!(reader.next(&mut buf), Err(Violation::TOO_BIG));
    // Exactly at the limit is fine.
    let mut reader = FrameReader::new(false, 10);
    let mut at_limit = &wire(true, OP_BINARY, &[0; 10], false)[..];
    assert!(matches!(reader.next(&mut at_limit), Ok(Some(Step::Data { .. }))));
}

#[test]
fn mask_rotation_matches_a_byte_by_byte_mask() {
    let data = (0..=255u8).collect::<Vec<u8>>();
    for offset in 0..8u64 {
        for len in [0, 1, 7, 8, 9, 31, 200] {
            let mut fast = data[..len].to_vec();
            apply_mask(&mut fast, rotate(KEY, offset));
            let slow =
                data[..len].iter().enumerate().map(|(i, b)| b ^ KEY[(offset as usize + i) % 4]).collect::<Vec<u8>>();
            assert_eq!(fast, slow, "offset {offset}, len {len}");
        }
    }
}

#[test]
fn utf8_is_checked_across_piece_boundaries() {
    let text = "aé€😀z".as_bytes();
    for cut in 0..=text.len() {
        for cut2 in cut..=text.len() {
            let mut check = Utf8Check::default();
            assert!(check.check(&text[..cut], false).is_ok(), "{cut}");
            assert!(check.check(&text[cut..cut2], false).is_ok(), "{cut}..{cut2}");
            assert!(check.check(&text[cut2..], true).is_ok(), "{cut2}..");
        }
    }
    // A character cut off by the end of the message.
    let mut check = Utf8Check::default();
    assert!(check.check(&text[..2], false).is_ok());
    assert!(check.check(&[], true).is_err());
    // Invalid bytes fail at once, inside a piece or completing a kept character.
    assert!(Utf8Check::default().check(b"ok\xffok", false).is_err());
    let mut check = Utf8Check::default();
    assert!(check.check(b"\xe2\x82", false).is_ok());
    assert!(check.check(b"A", false).is_err());
    // Surrogates and overlong forms are not UTF-8, even split.
    let mut check = Utf8Check::default();
    assert!(check.check(b"\xed", false).is_ok());
    assert!(check.check(b"\xa0\x80", false).is_err());
}

#[test]
fn close_payloads() {
    assert_eq!(parse_close(&[]), Ok(None));
    assert_eq!(parse_close(&[0x03]).unwrap_err().code, 1002);
    assert_eq!(parse_close(&[0x03, 0xe8, b'o', b'k']), Ok(Some((1000, "ok"))));
    assert_eq!(parse_close(&[0x03, 0xf6]), Ok(Some((1014, ""))), "1014, Bad Gateway, is sent by wskeep itself");
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        assert_eq!(parse_close(&code.to_be_bytes()).unwrap_err().code, 1002, "{code}");
    }
    for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 3000, 4999] {
        assert!(parse_close(&code.to_be_bytes()).is_ok(), "{code}");
    }
    assert_eq!(parse_close(&[0x03, 0xe8, 0xff]), Err(Violation::INVALID_UTF8));
}

#[test]
fn a_refused_frame_is_passed_over_so_the_peers_close_reads_as_a_frame() {
    let refused = [
        (wire(true, OP_BINARY, &[9; 20], true), Violation::TOO_BIG),
        (wire(true, 0x3, b"reserved opcode", true), Violation::protocol("reserved opcode")),
    ];
    for (bad, violation) in refused {
        let input = [bad, wire(true, OP_CLOSE, &[0x03, 0xe8], true)].concat();
        for split in [1, 3, 7, input.len()] {
            let mut reader = FrameReader::new(true, 10);
            let mut refusal = None;
            let mut closed = false;
            for chunk in input.chunks(split) {
                let mut buf = chunk;
                loop {
                    match reader.next(&mut buf) {
                        Ok(Some(Step::Control(Control::Close))) => closed = reader.control_payload() == [0x03, 0xe8],
                        Ok(Some(step)) => panic!("unexpected {step:?}"),
                        Ok(None) => break,
                        Err(v) => refusal = Some(v),
                    }
                }
            }
            assert_eq!(refusal, Some(violation), "split {split}");
            assert!(closed, "split {split}: the close after the refused frame was read");
        }
    }
}

#[test]
fn a_control_frame_on_the_stack_is_the_same_bytes() {
    for payload in [&b""[..], b"12345678", &[7; MAX_CONTROL]] {
        for masked in [false, true] {
            let frame = ControlFrame::new(OP_PING, payload, masked.then_some(KEY));
            assert_eq!(frame.as_bytes(), wire(true, OP_PING, payload, masked));
        }
    }
}

#[test]
fn with_deflate_rsv1_may_start_a_message_and_nothing_else() {
    let with_rsv = |frame: Vec<u8>, rsv: u8| [&[frame[0] | rsv][..], &frame[1..]].concat();
    let read = |input: &[u8]| {
        let mut reader = FrameReader::new(false, MAX).with_deflate(true);
        let mut buf = input;
        let mut frames = Vec::new();
        while let Some(step) = reader.next(&mut buf)? {
            if let Step::Data { frame, offset: 0, .. } = step {
                frames.push((frame.opcode(), frame.compressed));
            }
        }
        Ok::<_, Violation>(frames)
    };
    // A compressed message in two frames: RSV1 on the first only, and written back the same way.
    let message =
        [with_rsv(wire(false, OP_TEXT, b"ab", false), RSV1), wire(true, OP_CONTINUATION, b"cd", false)].concat();
    assert_eq!(read(&message), Ok(vec![(OP_TEXT | RSV1, true), (OP_CONTINUATION, true)]));
    assert_eq!(read(&wire(true, OP_BINARY, b"x", false)), Ok(vec![(OP_BINARY, false)]), "uncompressed is fine too");
    for (what, input) in [
        (
            "RSV1 on a continuation",
            [wire(false, OP_TEXT, b"a", false), with_rsv(wire(true, 0, b"b", false), RSV1)].concat(),
        ),
        ("RSV1 on a ping", with_rsv(wire(true, OP_PING, b"", false), RSV1)),
        ("RSV2", with_rsv(wire(true, OP_TEXT, b"a", false), 0x20)),
        ("RSV1 and RSV3", with_rsv(wire(true, OP_TEXT, b"a", false), RSV1 | 0x10)),
    ] {
        assert_eq!(read(&input).map_err(|v| v.code), Err(1002), "{what}");
    }
    // Without the extension, RSV1 is refused (the "RSV1" case above, for a client).
    let mut plain = FrameReader::new(false, MAX);
    assert!(plain.next(&mut &with_rsv(wire(true, OP_TEXT, b"a", false), RSV1)[..]).is_err());
}
