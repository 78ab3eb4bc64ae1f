//! What a WebSocket request says about resuming: the `wskeep_` query parameters (removed before
//! the request goes upstream) and the credentials `resume.bind` ties a session to.

use hyper::header::{HeaderMap, HeaderName, AUTHORIZATION, COOKIE, ORIGIN};

use super::token::Token;

/// What the client asks for with `wskeep_resume=1`.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    /// A new resumable session.
    New,
    /// Resume the session of `token` (`None`: the parameter is malformed or missing), whose
    /// client received `received` messages (`None`: missing or not a number).
    Resume { token: Option<Token>, received: Option<u64> },
}

/// The client's ask, from the request's query; `None` without `wskeep_resume=1`.
pub fn ask(query: Option<&str>) -> Option<Ask> {
    let (mut resume, mut token, mut received, mut has_token) = (false, None, None, false);
    for (name, value) in pairs(query) {
        match name {
            "wskeep_resume" => resume |= value == "1",
            "wskeep_token" => {
                has_token = true;
                token = Token::parse(value);
            }
            "wskeep_received" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                received = value.parse().ok()
            }
            _ => {}
        }
    }
    resume.then_some(if has_token { Ask::Resume { token, received } } else { Ask::New })
}

/// The query without wskeep's own parameters (every name starting with `wskeep_`), as sent
/// upstream; `None` when nothing is left.
pub fn strip_query(query: &str) -> Option<String> {
    let kept: Vec<&str> = query.split('&').filter(|pair| !pair.starts_with("wskeep_")).collect();
    let kept = kept.join("&");
    (!kept.is_empty()).then_some(kept)
}

fn pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query.unwrap_or("").split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// A credential a resuming handshake must carry as the first one did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindKey {
    Authorization,
    Origin,
    Cookie(String),
    Query(String),
    Header(HeaderName),
}

impl BindKey {
    pub fn parse(entry: &str) -> Result<BindKey, String> {
        let named = |kind: &str, name: &str| {
            if name.is_empty() {
                Err(format!("{entry:?}: {kind}: needs a name, as in \"{kind}:session\""))
            } else {
                Ok(name.to_string())
            }
        };
        match entry.split_once(':') {
            None if entry == "authorization" => Ok(BindKey::Authorization),
            None if entry == "origin" => Ok(BindKey::Origin),
            Some(("cookie", name)) => named("cookie", name).map(BindKey::Cookie),
            Some(("query", name)) if name.starts_with("wskeep_") => {
                Err(format!("{entry:?}: wskeep's own parameters cannot be bound"))
            }
            Some(("query", name)) => named("query", name).map(BindKey::Query),
            Some(("header", name)) => HeaderName::try_from(named("header", name)?)
                .map(BindKey::Header)
                .map_err(|_| format!("{entry:?}: not a header name")),
            _ => Err(format!(
                "{entry:?} is not one of \"authorization\", \"origin\", \"cookie:NAME\", \"query:NAME\", \"header:NAME\""
            )),
        }
    }
}

/// The bound credentials of a request, in an unambiguous encoding (each value length-prefixed,
/// an absent one marked), to be hashed. The Origin is always part of it: a page's Origin is the
/// browser's word, so a token carried off to another site does not resume there.
pub fn bound_values(bind: &[BindKey], headers: &HeaderMap, query: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |value: Option<&[u8]>| match value {
        Some(v) => {
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    };
    let header = |name: &HeaderName| {
        let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        (!values.is_empty()).then(|| values.join(&0u8))
    };
    put(header(&ORIGIN).as_deref());
    for key in bind {
        match key {
            BindKey::Authorization => put(header(&AUTHORIZATION).as_deref()),
            BindKey::Origin => {}
            BindKey::Header(name) => put(header(name).as_deref()),
            BindKey::Cookie(name) => {
                let cookie = headers
                    .get_all(COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|c| c.trim().split_once('='))
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_bytes());
                put(cookie)
            }
            BindKey::Query(name) => put(pairs(query).find(|(n, _)| n == name).map(|(_, v)| v.as_bytes())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ask_and_strips_wskeeps_parameters() {
        assert_eq!(ask(Some("a=1")), None);
        assert_eq!(ask(Some("wskeep_resume=0")), None);
        assert_eq!(ask(Some("a=1&wskeep_resume=1")), Some(Ask::New));
        let token = Token::generate().unwrap();
        let q = format!("wskeep_resume=1&wskeep_token={}&wskeep_received=7", token.encode());
        assert_eq!(ask(Some(&q)), Some(Ask::Resume { token: Some(token), received: Some(7) }));
        assert_eq!(
            ask(Some("wskeep_resume=1&wskeep_token=x&wskeep_received=-1")),
            Some(Ask::Resume { token: None, received: None })
        );
        assert_eq!(strip_query("a=1&wskeep_resume=1&b=2&wskeep_token=x").as_deref(), Some("a=1&b=2"));
        assert_eq!(strip_query("wskeep_resume=1"), None);
    }

    #[test]
    fn bind_entries_are_checked() {
        assert_eq!(BindKey::parse("cookie:sid"), Ok(BindKey::Cookie("sid".into())));
        assert!(matches!(BindKey::parse("header:x-user"), Ok(BindKey::Header(_))));
        for bad in ["cookie:", "query:wskeep_token", "header:bad name", "host", "cookie"] {
            assert!(BindKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bound_values_differ_when_a_bound_credential_does() {
        let bind = [BindKey::Authorization, BindKey::Cookie("sid".into()), BindKey::Query("room".into())];
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer a".parse().unwrap());
        h.insert(COOKIE, "x=1; sid=abc".parse().unwrap());
        let base = bound_values(&bind, &h, Some("room=5&other=1"));
        assert_eq!(base, bound_values(&bind, &h, Some("other=2&room=5")));
        assert_ne!(base, bound_values(&bind, &h, Some("room=6")));
        let mut other = h.clone();
        other.insert(COOKIE, "sid=abd".parse().unwrap());
        assert_ne!(base, bound_values(&bind, &other, Some("room=5")));
        other = h.clone();
        other.insert(ORIGIN, "https://evil.example".parse().unwrap());
        assert_ne!(base, bound_values(&bind, &other, Some("room=5")), "the Origin is always bound");
        other = h.clone();
        other.remove(AUTHORIZATION);
        assert_ne!(base, bound_values(&bind, &other, Some("room=5")));
    }
}
