//! Who may write what: administrators write any section of any operator; an operator writes
//! its own `channels` and `certificates` with its own signing key (so that it can move or
//! rotate keys without an administrator); nobody else writes anything.

use crate::directory::Directory;

/// The sections an operator may write for itself.
pub const OPERATOR_SECTIONS: [&str; 2] = ["channels", "certificates"];

/// Who the directory's administrators are. The root of trust comes from the reader's own
/// settings, never from the chain a directory server hands out.
#[derive(Debug, Clone, Default)]
pub struct Administrators {
    /// SHA-256 fingerprints (lowercase hex) of the administrators' signing certificates.
    pub fingerprints: Vec<String>,
    /// Members of this group (by the directory as folded so far) whose signing certificate is
    /// pinned as `signing` in their own entry are administrators too: the listed
    /// administrators can name more without a settings change anywhere.
    pub group: Option<String>,
}

/// The role a signer writes a record in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Administrator,
    /// The operator writing one of its own [`OPERATOR_SECTIONS`].
    Operator,
}

/// Why a signer may not write a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RightsError {
    /// The certificate is not an administrator's and not pinned as a signing certificate of
    /// the operator it names.
    #[error("the signing certificate of {signer} (sha256 {fingerprint}) is not an administrator's, and not pinned with key_usage \"signing\" in {signer}'s certificates")]
    NotPinned { signer: String, fingerprint: String },
    /// An operator wrote another operator's section.
    #[error("{signer} may not write {name}'s {section}: only administrators write another operator's records")]
    OtherOperator {
        signer: String,
        name: String,
        section: String,
    },
    /// An operator wrote one of its own sections that only administrators write.
    #[error("{signer} may write only its own channels and certificates; its {section} are written by administrators")]
    AdministratorSection { signer: String, section: String },
}

/// Decides whether the holder of the signing certificate (`signer`, `fingerprint`) may write
/// `name`'s `section`, given the directory as folded before the record.
pub fn authorize(
    directory: &Directory,
    administrators: &Administrators,
    signer: &str,
    fingerprint: &str,
    name: &str,
    section: &str,
) -> Result<Role, RightsError> {
    let own = directory
        .entry(signer)
        .filter(|e| e.pins_signing(fingerprint));
    let listed = administrators
        .fingerprints
        .iter()
        .any(|f| f.eq_ignore_ascii_case(fingerprint));
    let by_group = match (&administrators.group, own) {
        (Some(g), Some(e)) => e.groups.contains(g),
        _ => false,
    };
    if listed || by_group {
        return Ok(Role::Administrator);
    }
    if own.is_none() {
        return Err(RightsError::NotPinned {
            signer: signer.to_string(),
            fingerprint: fingerprint.to_string(),
        });
    }
    if name != signer {
        return Err(RightsError::OtherOperator {
            signer: signer.to_string(),
            name: name.to_string(),
            section: section.to_string(),
        });
    }
    if !OPERATOR_SECTIONS.contains(&section) {
        return Err(RightsError::AdministratorSection {
            signer: signer.to_string(),
            section: section.to_string(),
        });
    }
    Ok(Role::Operator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Record;
    use serde_json::json;

    fn dir() -> Directory {
        let rec = |name: &str, section: &str, data| Record {
            name: name.into(),
            section: section.into(),
            data,
            created_at: None,
        };
        let pins = |fp: &str| {
            json!([{"fingerprint": fp, "key_usage": "signing"},
                                     {"fingerprint": "ee", "key_usage": "encryption"}])
        };
        Directory::from_records(&[
            rec("bob", "certificates", pins("b0b")),
            rec("carol", "certificates", pins("ca201")),
            rec("carol", "groups", json!(["sd-admins"])),
        ])
        .unwrap()
    }

    #[test]
    fn administrators_write_anything() {
        let admins = Administrators {
            fingerprints: vec!["AD".into()],
            group: None,
        };
        for section in ["groups", "services", "channels"] {
            assert_eq!(
                authorize(&dir(), &admins, "root", "ad", "bob", section),
                Ok(Role::Administrator)
            );
        }
        // An unknown certificate is nobody, even for a name nobody has yet.
        assert!(matches!(
            authorize(&dir(), &admins, "zed", "2ed", "zed", "channels"),
            Err(RightsError::NotPinned { .. })
        ));
    }

    #[test]
    fn operators_write_their_own_channels_and_certificates_only() {
        let admins = Administrators::default();
        let d = dir();
        for section in ["channels", "certificates"] {
            assert_eq!(
                authorize(&d, &admins, "bob", "B0B", "bob", section),
                Ok(Role::Operator)
            );
        }
        let e = authorize(&d, &admins, "bob", "b0b", "carol", "channels").unwrap_err();
        assert!(matches!(e, RightsError::OtherOperator { .. }), "{e}");
        assert!(
            e.to_string().contains("may not write carol's channels"),
            "{e}"
        );
        let e = authorize(&d, &admins, "bob", "b0b", "bob", "groups").unwrap_err();
        assert!(matches!(e, RightsError::AdministratorSection { .. }), "{e}");
        // bob's TLS certificate, or carol's signing certificate claiming to be bob's, is no
        // signing key of bob's.
        for fp in ["ee", "ca201"] {
            assert!(matches!(
                authorize(&d, &admins, "bob", fp, "bob", "channels"),
                Err(RightsError::NotPinned { .. })
            ));
        }
    }

    #[test]
    fn the_administrator_group_counts_only_with_a_pinned_signing_key() {
        let admins = Administrators {
            fingerprints: vec![],
            group: Some("sd-admins".into()),
        };
        let d = dir();
        assert_eq!(
            authorize(&d, &admins, "carol", "ca201", "bob", "services"),
            Ok(Role::Administrator)
        );
        assert!(authorize(&d, &admins, "carol", "ee", "bob", "services").is_err());
        assert!(authorize(&d, &admins, "bob", "b0b", "bob", "services").is_err());
    }
}
