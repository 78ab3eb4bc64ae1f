//! How a configuration key is declared, read and printed.
//!
//! `settings!` takes each key once (section, name, type, default) and generates the section
//! structs, their `Default`, the tolerant reader (every key read on its own, each mistake a
//! `Problem` with its key path) and the printer behind `wskeep check`. A key's type says how it
//! is written: `Setting` turns a TOML or environment value into it, naming the value when it is
//! wrong, and back into TOML.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::value::Value;
use serde_json::{Map, Value as Json};

use super::{LogFormat, ProxyProtocol};
use crate::cidr::Cidr;
use crate::size::ByteSize;

/// A type a configuration key can have.
pub trait Setting: Sized {
    /// Reads a value as written in the file or a variable; the error shows the value and says
    /// what was expected.
    fn read(value: &Value) -> Result<Self, String>;
    /// The value as `wskeep check` prints it; `None` leaves the key out (an unset option).
    fn write(&self) -> Option<toml::Value>;
}

/// Declares the configuration: `[section] Type { key: type = default, ... }`, optionally
/// followed by `derived { field: type = default, ... }` for fields that `validate` computes from
/// the keys (never read, never printed). `field("name")` gives a key a name that is not a Rust
/// identifier.
macro_rules! settings {
    ($(
        $(#[$section_doc:meta])*
        [$section:ident] $Section:ident {
            $( $(#[$doc:meta])* $field:ident $(($key:literal))? : $ty:ty = $default:expr, )*
        }
        $( derived { $( $(#[$ddoc:meta])* $dfield:ident : $dty:ty = $ddefault:expr, )* } )?
    )*) => {
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[$section_doc])* pub $section: $Section, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $section: $Section::default(), )* }
            }
        }

        $(
            #[derive(Debug, Clone)]
            pub struct $Section {
                $( $(#[$doc])* pub $field: $ty, )*
                $( $( $(#[$ddoc])* pub $dfield: $dty, )* )?
            }

            impl Default for $Section {
                fn default() -> Self {
                    $Section {
                        $( $field: $default, )*
                        $( $( $dfield: $ddefault, )* )?
                    }
                }
            }

            impl serde::Serialize for $Section {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    use serde::ser::SerializeMap;
                    let mut map = s.serialize_map(None)?;
                    $(
                        if let Some(value) = keys::Setting::write(&self.$field) {
                            map.serialize_entry(key_name!($field $(, $key)?), &value)?;
                        }
                    )*
                    map.end()
                }
            }
        )*

        impl serde::Serialize for Config {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(None)?;
                $( map.serialize_entry(stringify!($section), &self.$section)?; )*
                map.end()
            }
        }

        /// Every section with its keys, in the order they are declared.
        pub const KEYS: &[(&str, &[&str])] = &[
            $( (stringify!($section), &[ $( key_name!($field $(, $key)?), )* ]), )*
        ];

        impl Config {
            /// Reads every declared key of `dict` on its own, defaults where absent.
            fn read_keys(dict: &figment::value::Dict, problems: &mut Vec<Problem>) -> Config {
                Config {
                    $( $section: {
                        let table = keys::section(dict, stringify!($section));
                        let defaults = $Section::default();
                        $Section {
                            $( $field: keys::read(
                                table,
                                stringify!($section),
                                key_name!($field $(, $key)?),
                                defaults.$field,
                                problems,
                            ), )*
                            $( $( $dfield: defaults.$dfield, )* )?
                        }
                    }, )*
                }
            }
        }
    };
}

macro_rules! key_name {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident, $key:literal) => {
        $key
    };
}

/// The table of a section, when the section is one (`finish` reports one that is not).
pub fn section<'a>(dict: &'a figment::value::Dict, name: &str) -> Option<&'a figment::value::Dict> {
    match dict.get(name) {
        Some(Value::Dict(_, table)) => Some(table),
        _ => None,
    }
}

/// Reads `section.key` from its table, keeping `default` when the key is absent or wrong.
pub fn read<T: Setting>(
    table: Option<&figment::value::Dict>,
    section: &str,
    key: &str,
    default: T,
    problems: &mut Vec<super::Problem>,
) -> T {
    let Some(value) = table.and_then(|t| t.get(key)) else { return default };
    T::read(value).unwrap_or_else(|message| {
        problems.push(super::Problem { key: format!("{section}.{key}"), message });
        default
    })
}

/// A value as the operator wrote it, TOML-quoted, shortened if long.
pub fn shown(value: &Value) -> String {
    let text = match toml::Value::try_from(value) {
        Ok(v) => v.to_string(),
        Err(_) => format!("{value:?}"),
    };
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::String(_, s) => Some(s),
        _ => None,
    }
}

impl Setting for SocketAddr {
    fn read(value: &Value) -> Result<Self, String> {
        text(value).and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
            format!(
                "{} is not a socket address: write an IP address and a port, such as \"0.0.0.0:8443\" \
                 (host names are not resolved)",
                shown(value)
            )
        })
    }
    fn write(&self) -> Option<toml::Value> {
        Some(self.to_string().into())
    }
}

/// An optional file: `""` means unset (so a variable can clear what the file set).
impl Setting for Option<PathBuf> {
    fn read(value: &Value) -> Result<Self, String> {
        match text(value) {
            Some("") => Ok(None),
            Some(s) => Ok(Some(PathBuf::from(s))),
            None => Err(format!("{} is not a file path: write it in quotes", shown(value))),
        }
    }
    fn write(&self) -> Option<toml::Value> {
        self.as_ref().map(|p| p.display().to_string().into())
    }
}

impl Setting for Duration {
    fn read(value: &Value) -> Result<Self, String> {
        text(value).and_then(|s| humantime::parse_duration(s.trim()).ok()).ok_or_else(|| {
            format!(
                "{} is not a duration: write a number and a unit, such as \"250ms\", \"20s\" or \"5m\"",
                shown(value)
            )
        })
    }
    fn write(&self) -> Option<toml::Value> {
        Some(humantime::format_duration(*self).to_string().into())
    }
}

impl Setting for u64 {
    fn read(value: &Value) -> Result<Self, String> {
        match value {
            Value::Num(_, n) => n.to_u128_lossy().and_then(|n| u64::try_from(n).ok()),
            _ => None,
        }
        .ok_or_else(|| format!("{} is not a whole number", shown(value)))
    }
    fn write(&self) -> Option<toml::Value> {
        // TOML integers are i64; larger counts are not meaningful for any key.
        Some(i64::try_from(*self).unwrap_or(i64::MAX).into())
    }
}

impl Setting for bool {
    fn read(value: &Value) -> Result<Self, String> {
        match value {
            Value::Bool(_, b) => Ok(*b),
            _ => Err(format!("{} is not true or false", shown(value))),
        }
    }
    fn write(&self) -> Option<toml::Value> {
        Some((*self).into())
    }
}

impl Setting for String {
    fn read(value: &Value) -> Result<Self, String> {
        text(value).map(str::to_string).ok_or_else(|| format!("{} is not a string: write it in quotes", shown(value)))
    }
    fn write(&self) -> Option<toml::Value> {
        Some(self.clone().into())
    }
}

impl Setting for ByteSize {
    fn read(value: &Value) -> Result<Self, String> {
        let size = match value {
            Value::Num(_, n) => n.to_u128_lossy().and_then(|n| u64::try_from(n).ok()).map(ByteSize),
            Value::String(_, s) => s.parse().ok(),
            _ => None,
        };
        size.ok_or_else(|| format!("{} is not a size, such as \"64KiB\", \"16MiB\" or 4096 (bytes)", shown(value)))
    }
    fn write(&self) -> Option<toml::Value> {
        Some(self.to_string().into())
    }
}

impl Setting for LogFormat {
    fn read(value: &Value) -> Result<Self, String> {
        match text(value) {
            Some("json") => Ok(LogFormat::Json),
            Some("text") => Ok(LogFormat::Text),
            _ => Err(format!("{} is not a log format: use \"json\" or \"text\"", shown(value))),
        }
    }
    fn write(&self) -> Option<toml::Value> {
        Some(
            match self {
                LogFormat::Json => "json",
                LogFormat::Text => "text",
            }
            .into(),
        )
    }
}

/// A JSON object written as a TOML table (`{ type = "ping" }`).
impl Setting for Map<String, Json> {
    fn read(value: &Value) -> Result<Self, String> {
        let Value::Dict(..) = value else {
            return Err(format!("{} is not a table: write it like {{ type = \"ping\" }}", shown(value)));
        };
        let map: Self = value.deserialize().map_err(|e| format!("{} cannot be read: {}", shown(value), e.kind))?;
        // nan and inf become JSON null, which neither a peer nor `check`'s output can carry.
        match toml::Value::try_from(&map) {
            Ok(_) => Ok(map),
            Err(_) => Err(format!("{} holds a number JSON cannot carry (nan or inf)", shown(value))),
        }
    }
    fn write(&self) -> Option<toml::Value> {
        // `read` let through only tables that TOML can write back.
        toml::Value::try_from(self).ok()
    }
}

/// A list of field names.
impl Setting for Vec<String> {
    fn read(value: &Value) -> Result<Self, String> {
        let bad = || format!("{} is not a list of names: write it like [\"id\", \"ts\"]", shown(value));
        match value {
            Value::Array(_, items) => items.iter().map(|v| text(v).map(str::to_string).ok_or_else(bad)).collect(),
            _ => Err(bad()),
        }
    }
    fn write(&self) -> Option<toml::Value> {
        Some(toml::Value::Array(self.iter().map(|s| s.clone().into()).collect()))
    }
}

impl Setting for ProxyProtocol {
    fn read(value: &Value) -> Result<Self, String> {
        let name = text(value).map(str::trim);
        ProxyProtocol::NAMES.iter().find(|(n, _)| Some(*n) == name).map(|(_, mode)| *mode).ok_or_else(|| {
            format!("{} is not a PROXY protocol setting: use \"off\", \"v1\", \"v2\" or \"any\"", shown(value))
        })
    }
    fn write(&self) -> Option<toml::Value> {
        Some(self.as_str().into())
    }
}

/// Address ranges, `["10.0.0.0/8", "::1"]`.
impl Setting for Vec<Cidr> {
    fn read(value: &Value) -> Result<Self, String> {
        let Value::Array(_, items) = value else {
            return Err(format!("{} is not a list of ranges: write it like [\"10.0.0.0/8\", \"::1\"]", shown(value)));
        };
        items
            .iter()
            .map(|v| match text(v) {
                Some(s) => s.parse::<Cidr>(),
                None => Err(format!("{} is not a range: write it in quotes, like \"10.0.0.0/8\"", shown(v))),
            })
            .collect()
    }
    fn write(&self) -> Option<toml::Value> {
        Some(toml::Value::Array(self.iter().map(|c| c.to_string().into()).collect()))
    }
}
