//! The session token: a public id that finds the session and a secret that proves the holder,
//! both from the OS's CSPRNG, written `<id>.<secret>` in base64url without padding.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

pub type Id = [u8; 12];
pub type Secret = [u8; 32];

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: Id,
    pub secret: Secret,
}

impl std::fmt::Debug for Token {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", URL_SAFE_NO_PAD.encode(self.id))
    }
}

impl Token {
    /// A fresh token; `None` only if the OS refuses randomness.
    pub fn generate() -> Option<Token> {
        let rng = SystemRandom::new();
        let mut token = Token { id: [0; 12], secret: [0; 32] };
        rng.fill(&mut token.id).ok()?;
        rng.fill(&mut token.secret).ok()?;
        Some(token)
    }

    pub fn encode(&self) -> String {
        format!("{}.{}", URL_SAFE_NO_PAD.encode(self.id), URL_SAFE_NO_PAD.encode(self.secret))
    }

    /// `None` for anything that is not exactly an id and a secret of the right lengths.
    pub fn parse(text: &str) -> Option<Token> {
        let (id, secret) = text.split_once('.')?;
        let id: Id = URL_SAFE_NO_PAD.decode(id).ok()?.try_into().ok()?;
        let secret: Secret = URL_SAFE_NO_PAD.decode(secret).ok()?.try_into().ok()?;
        Some(Token { id, secret })
    }

    /// Constant time in the secret's contents.
    pub fn secret_matches(&self, secret: &Secret) -> bool {
        self.secret.ct_eq(secret).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_malformed_tokens() {
        let token = Token::generate().unwrap();
        let text = token.encode();
        assert_eq!(text.len(), 16 + 1 + 43);
        assert_eq!(Token::parse(&text), Some(token.clone()));
        assert_ne!(Token::generate().unwrap(), token, "two tokens are never the same");
        for bad in ["", ".", "abc", &text[..text.len() - 1], &format!("{text}A"), &text.replace('.', ""), "a.b.c"] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
        assert!(!format!("{token:?}").contains(&text[17..]), "Debug shows no secret");
    }
}
