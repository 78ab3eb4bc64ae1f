//! permessage-deflate negotiation (RFC 7692), passed through rather than terminated.
//!
//! The client's permessage-deflate offers go to the upstream (any other extension is dropped);
//! the upstream's answer is checked against them and goes back to the client with
//! `client_no_context_takeover` added (RFC 7692 §7.1.1.1 lets a server add it to any answer). The
//! client then compresses every message on its own, so wskeep can inflate a candidate JSON ping
//! alone (`crate::inflate`) and drop one without breaking the upstream's decoder. Compressed
//! frames cross wskeep unchanged; wskeep keeps no compression context.

use std::fmt::Write as _;

use hyper::header::{self, HeaderMap, HeaderValue};

pub const NAME: &str = "permessage-deflate";

/// One permessage-deflate parameter set, as offered or agreed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value (the client merely supports the parameter).
    pub client_max_window_bits: Option<Option<u8>>,
}

impl Params {
    /// Reads one extension element's parameters; `None` if one is unknown, repeated or has a bad
    /// value. `offer`: `client_max_window_bits` may come without a value.
    fn parse<'a>(params: impl Iterator<Item = (&'a str, Option<&'a str>)>, offer: bool) -> Option<Params> {
        let mut p = Params::default();
        for (name, value) in params {
            let bits = || value.and_then(|v| v.parse::<u8>().ok()).filter(|b| (8..=15).contains(b));
            let repeated = match name.to_ascii_lowercase().as_str() {
                "server_no_context_takeover" if value.is_none() => {
                    std::mem::replace(&mut p.server_no_context_takeover, true)
                }
                "client_no_context_takeover" if value.is_none() => {
                    std::mem::replace(&mut p.client_no_context_takeover, true)
                }
                "server_max_window_bits" => p.server_max_window_bits.replace(bits()?).is_some(),
                "client_max_window_bits" if value.is_none() && offer => {
                    p.client_max_window_bits.replace(None).is_some()
                }
                "client_max_window_bits" => p.client_max_window_bits.replace(Some(bits()?)).is_some(),
                _ => return None,
            };
            if repeated {
                return None;
            }
        }
        Some(p)
    }

    /// Whether `self`, an answer, accepts `offer` (RFC 7692 §7.1): a requested
    /// `server_no_context_takeover` is kept, a `server_max_window_bits` limit is kept or lowered,
    /// and `client_max_window_bits` is set only if offered, never above the offered value.
    fn answers(&self, offer: &Params) -> bool {
        let server_bits = match (offer.server_max_window_bits, self.server_max_window_bits) {
            (Some(limit), Some(bits)) => bits <= limit,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let client_bits = match (offer.client_max_window_bits, self.client_max_window_bits) {
            (_, None) => true,
            (Some(None), Some(_)) => true,
            (Some(Some(limit)), Some(Some(bits))) => bits <= limit,
            _ => false,
        };
        (self.server_no_context_takeover || !offer.server_no_context_takeover) && server_bits && client_bits
    }

    fn write(&self, out: &mut String) {
        out.push_str(NAME);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            let _ = write!(out, "; server_max_window_bits={bits}");
        }
        match self.client_max_window_bits {
            Some(Some(bits)) => {
                let _ = write!(out, "; client_max_window_bits={bits}");
            }
            Some(None) => out.push_str("; client_max_window_bits"),
            None => {}
        }
    }
}

/// The client's permessage-deflate offers that wskeep can pass on, in its order of preference.
pub fn client_offers(headers: &HeaderMap) -> Vec<Params> {
    elements(headers)
        .filter(|(name, _)| name.eq_ignore_ascii_case(NAME))
        .filter_map(|(_, params)| Params::parse(params.into_iter(), true))
        .collect()
}

/// The `Sec-WebSocket-Extensions` header that carries `offers` to the upstream.
pub fn offer_header(offers: &[Params]) -> Option<HeaderValue> {
    let mut value = String::new();
    for offer in offers {
        if !value.is_empty() {
            value.push_str(", ");
        }
        offer.write(&mut value);
    }
    // Built from fixed names and numbers only.
    (!offers.is_empty()).then(|| HeaderValue::from_str(&value).expect("ASCII without controls"))
}

/// What the upstream's 101 agreed to, checked against what was offered (RFC 6455 §9.1, RFC 7692
/// §7.1): `None` if it chose no extension.
pub fn agreed(headers: &HeaderMap, offers: &[Params]) -> Result<Option<Params>, &'static str> {
    let mut chosen = elements(headers);
    let Some((name, params)) = chosen.next() else { return Ok(None) };
    if offers.is_empty() || !name.eq_ignore_ascii_case(NAME) {
        return Err("the upstream chose an extension that was not offered");
    }
    if chosen.next().is_some() {
        return Err("the upstream chose more than one extension");
    }
    let agreed =
        Params::parse(params.into_iter(), false).ok_or("the upstream's permessage-deflate parameters are not valid")?;
    if !offers.iter().any(|offer| agreed.answers(offer)) {
        return Err("the upstream's permessage-deflate answer fits none of the offers");
    }
    Ok(Some(agreed))
}

/// Whether `answer` (a client answer this session gave before) accepts one of `offers`: a
/// resumed connection keeps the first one's parameters.
pub fn allows(answer: &HeaderValue, offers: &[Params]) -> bool {
    let mut headers = HeaderMap::new();
    headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, answer.clone());
    agreed(&headers, offers).is_ok_and(|agreed| agreed.is_some())
}

/// The client's answer: what the upstream agreed to, with every client message compressed on
/// its own.
pub fn client_answer(agreed: &Params) -> HeaderValue {
    let mut value = String::new();
    Params { client_no_context_takeover: true, ..agreed.clone() }.write(&mut value);
    HeaderValue::from_str(&value).expect("ASCII without controls")
}

/// Every extension element in the `Sec-WebSocket-Extensions` headers: its name and parameters
/// (values unquoted). Elements that do not parse are skipped.
fn elements(headers: &HeaderMap) -> impl Iterator<Item = (&str, Vec<(&str, Option<&str>)>)> {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| split_outside_quotes(v, ','))
        .filter_map(|element| {
            let mut parts = split_outside_quotes(element, ';').map(str::trim);
            let name = parts.next().filter(|n| is_token(n))?;
            let params = parts
                .map(|param| match param.split_once('=') {
                    Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
                    None => (param, None),
                })
                .collect::<Vec<_>>();
            params.iter().all(|(k, v)| is_token(k) && v.is_none_or(is_token)).then_some((name, params))
        })
}

fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    s.split(move |c| {
        if c == '"' {
            quoted = !quoted;
        }
        c == sep && !quoted
    })
    .filter(|part| !part.trim().is_empty())
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

/// An RFC 9110 token (what extension names, parameter names and values must be).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn offers(values: &[&str]) -> Vec<Params> {
        client_offers(&headers(values))
    }

    #[test]
    fn browser_offers_are_kept_and_other_extensions_dropped() {
        // Chromium's and Firefox's offers.
        let chromium = offers(&["permessage-deflate; client_max_window_bits"]);
        assert_eq!(chromium, [Params { client_max_window_bits: Some(None), ..Params::default() }]);
        let mixed = offers(&["x-webkit-deflate-frame", "permessage-deflate; server_max_window_bits=\"10\", foo"]);
        assert_eq!(mixed, [Params { server_max_window_bits: Some(10), ..Params::default() }]);
        assert_eq!(
            offer_header(&mixed).unwrap(),
            "permessage-deflate; server_max_window_bits=10",
            "quotes dropped, the other extensions gone"
        );
        assert_eq!(offer_header(&offers(&["x-webkit-deflate-frame"])), None);
    }

    #[test]
    fn offers_that_break_the_rules_are_dropped() {
        for bad in [
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; unknown_parameter",
            "permessage-deflate; client_max_window_bits=7",
        ] {
            assert_eq!(offers(&[bad]), [], "{bad}");
        }
        let two = offers(&["permessage-deflate; client_max_window_bits=9, permessage-deflate"]);
        assert_eq!(two.len(), 2);
    }

    #[test]
    fn the_upstreams_answer_must_answer_an_offer() {
        let offered = offers(&["permessage-deflate; client_max_window_bits"]);
        assert_eq!(agreed(&headers(&[]), &offered), Ok(None));
        let python =
            agreed(&headers(&["permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"]), &offered);
        assert_eq!(
            python,
            Ok(Some(Params {
                server_max_window_bits: Some(12),
                client_max_window_bits: Some(Some(12)),
                ..Params::default()
            }))
        );
        assert!(agreed(&headers(&["permessage-deflate"]), &[]).is_err(), "nothing was offered");
        assert!(agreed(&headers(&["x-custom"]), &offered).is_err());
        assert!(agreed(&headers(&["permessage-deflate", "permessage-deflate"]), &offered).is_err());
        assert!(agreed(&headers(&["permessage-deflate; client_max_window_bits"]), &offered).is_err(), "needs a value");
        let no_takeover = offers(&["permessage-deflate; server_no_context_takeover"]);
        assert!(agreed(&headers(&["permessage-deflate"]), &no_takeover).is_err(), "must keep it");
        assert!(agreed(&headers(&["permessage-deflate; server_no_context_takeover"]), &no_takeover).is_ok());
        let limited = offers(&["permessage-deflate; server_max_window_bits=10; client_max_window_bits=12"]);
        assert!(agreed(&headers(&["permessage-deflate"]), &limited).is_err(), "the server's limit dropped");
        assert!(agreed(&headers(&["permessage-deflate; server_max_window_bits=11"]), &limited).is_err());
        let within = "permessage-deflate; server_max_window_bits=9; client_max_window_bits=12";
        assert!(agreed(&headers(&[within]), &limited).is_ok());
        let above = "permessage-deflate; server_max_window_bits=10; client_max_window_bits=13";
        assert!(agreed(&headers(&[above]), &limited).is_err());
        // Any one of several offers may be the one answered.
        let two = offers(&["permessage-deflate; server_max_window_bits=10, permessage-deflate"]);
        assert!(agreed(&headers(&["permessage-deflate"]), &two).is_ok());
        let without_bits = offers(&["permessage-deflate"]);
        assert!(agreed(&headers(&["permessage-deflate; client_max_window_bits=10"]), &without_bits).is_err());
    }

    #[test]
    fn a_resume_must_offer_what_the_session_agreed() {
        let answer = client_answer(&Params { server_max_window_bits: Some(12), ..Params::default() });
        assert!(allows(&answer, &offers(&["permessage-deflate; client_max_window_bits"])));
        assert!(!allows(&answer, &offers(&["permessage-deflate; server_max_window_bits=10"])), "a smaller limit");
        assert!(!allows(&answer, &[]), "no compression offered");
    }

    #[test]
    fn the_client_is_told_to_compress_each_message_alone() {
        let upstream = Params { server_max_window_bits: Some(12), ..Params::default() };
        assert_eq!(
            client_answer(&upstream),
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=12"
        );
        let already = Params { client_no_context_takeover: true, ..Params::default() };
        assert_eq!(client_answer(&already), "permessage-deflate; client_no_context_takeover");
    }
}
