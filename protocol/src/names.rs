//! Names that cross the wire, parsed into types that cannot hold a bad value:
//! [`VmName`], [`AgentName`], [`TrustDomain`], [`SpiffeId`], [`MigrationId`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty, too long, or a character outside the allowed set.
    #[error("invalid {kind} {value:?}: {why}")]
    Invalid {
        /// What was being parsed.
        kind: &'static str,
        /// The offending value (truncated).
        value: String,
        /// Which rule it broke.
        why: &'static str,
    },
}

fn check(kind: &'static str, v: &str, max: usize, extra: &[char]) -> Result<(), NameError> {
    let bad = |why| NameError::Invalid {
        kind,
        value: v.chars().take(80).collect(),
        why,
    };
    if v.is_empty() {
        return Err(bad("empty"));
    }
    if v.len() > max {
        return Err(bad("too long"));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c))
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '_' (and '.' where allowed)",
        ));
    }
    // Names become path components (a VM's runtime, disk and staging
    // directories): never `.`, `..` or a hidden file.
    if v.starts_with('.') {
        return Err(bad("must not start with '.'"));
    }
    Ok(())
}

/// Why the last name decoded on this thread was refused, for a decoder
/// to report: postcard replaces a type's own deserialization error with a
/// generic "Serde Deserialization Error", and an operator must see that
/// the VM name `..` is invalid, not that.
pub(crate) mod refusal {
    use std::cell::RefCell;

    thread_local! {
        static LAST: RefCell<Option<super::NameError>> = const { RefCell::new(None) };
    }

    /// Records why a value was refused.
    pub(crate) fn note(why: super::NameError) {
        LAST.with(|l| *l.borrow_mut() = Some(why));
    }

    /// Takes the reason recorded since the last call, if any.
    pub(crate) fn take() -> Option<super::NameError> {
        LAST.with(|l| l.borrow_mut().take())
    }
}

/// Notes `e` for the decoder ([`refusal`]) and returns it.
fn refused(e: NameError) -> NameError {
    refusal::note(e.clone());
    e
}

macro_rules! name_type {
    ($(#[$m:meta])* $name:ident, $kind:literal, $max:literal, $extra:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(v: String) -> Result<Self, NameError> {
                check($kind, &v, $max, $extra).map_err(refused)?;
                Ok($name(v))
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(v: &str) -> Result<Self, NameError> {
                $name::try_from(v.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A VM's name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` (so it
    /// is always one safe path component: never `.` or `..`).
    VmName, "VM name", 64, &['.']
);
name_type!(
    /// A VM disk's name: 1–32 of `[A-Za-z0-9_-]` (it names a file).
    DiskName, "disk name", 32, &[]
);
name_type!(
    /// An agent's or operator's short name: 1–64 of `[A-Za-z0-9._-]`.
    AgentName, "name", 64, &['.']
);
name_type!(
    /// A SPIFFE trust domain: 1–255 of `[a-z0-9._-]` (lower case enforced).
    TrustDomain, "trust domain", 255, &['.']
);

impl TrustDomain {
    /// Parses and lower-cases a trust domain.
    pub fn new(v: &str) -> Result<Self, NameError> {
        TrustDomain::try_from(v.to_ascii_lowercase())
    }
}

/// The kind of principal a SPIFFE ID names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Role {
    /// A Convoy agent on a host: `/agent/<name>`.
    Agent,
    /// A human or automation operator: `/operator/<name>`.
    Operator,
}

/// A Convoy principal: `spiffe://<trust-domain>/<agent|operator>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    domain: TrustDomain,
    role: Role,
    name: AgentName,
}

impl SpiffeId {
    /// An agent's ID.
    pub fn agent(domain: TrustDomain, name: AgentName) -> Self {
        SpiffeId {
            domain,
            role: Role::Agent,
            name,
        }
    }

    /// An operator's ID.
    pub fn operator(domain: TrustDomain, name: AgentName) -> Self {
        SpiffeId {
            domain,
            role: Role::Operator,
            name,
        }
    }

    /// Trust domain.
    pub fn domain(&self) -> &TrustDomain {
        &self.domain
    }

    /// Role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Short name.
    pub fn name(&self) -> &AgentName {
        &self.name
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Agent => "agent",
            Role::Operator => "operator",
        };
        write!(f, "spiffe://{}/{}/{}", self.domain, role, self.name)
    }
}

impl FromStr for SpiffeId {
    type Err = NameError;
    fn from_str(v: &str) -> Result<Self, NameError> {
        let bad = |why| NameError::Invalid {
            kind: "SPIFFE ID",
            value: v.chars().take(80).collect(),
            why,
        };
        let rest = v
            .strip_prefix("spiffe://")
            .ok_or(bad("must start with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(domain), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("must be spiffe://<domain>/<agent|operator>/<name>"));
        };
        if domain.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad("trust domain must be lower case"));
        }
        let role = match role {
            "agent" => Role::Agent,
            "operator" => Role::Operator,
            _ => return Err(bad("role must be agent or operator")),
        };
        Ok(SpiffeId {
            domain: TrustDomain::new(domain)?,
            role,
            name: name.parse()?,
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = NameError;
    fn try_from(v: String) -> Result<Self, NameError> {
        v.parse().map_err(refused)
    }
}

impl From<SpiffeId> for String {
    fn from(s: SpiffeId) -> String {
        s.to_string()
    }
}

/// A migration's identifier: 16 random bytes chosen by the source.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MigrationId(pub [u8; 16]);

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_round_trip_and_rejects() {
        let id: SpiffeId = "spiffe://convoy.internal/agent/host-a".parse().unwrap();
        assert_eq!(id.role(), Role::Agent);
        assert_eq!(id.to_string(), "spiffe://convoy.internal/agent/host-a");
        for bad in [
            "spiffe://Convoy/agent/a",
            "spiffe://d/agent",
            "spiffe://d/agent/a/b",
            "spiffe://d/admin/a",
            "https://d/agent/a",
            "spiffe:///agent/a",
            "spiffe://d/agent/a b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_bounded() {
        assert!("vm-1.prod".parse::<VmName>().is_ok());
        assert!("".parse::<VmName>().is_err());
        assert!("a/b".parse::<VmName>().is_err());
        // One safe path component: never `.`, `..` or hidden, from a
        // command line or off the wire.
        for bad in [".", "..", ".hidden"] {
            assert!(bad.parse::<VmName>().is_err(), "{bad}");
            let wire = postcard::to_stdvec(bad).unwrap();
            assert!(postcard::from_bytes::<VmName>(&wire).is_err(), "{bad}");
        }
        assert!("x".repeat(65).parse::<VmName>().is_err());
    }
}
