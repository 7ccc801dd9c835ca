//! Which S3 service and credentials an `s3://` snapshot URL is reached
//! with: named profiles of the AWS shared files (`~/.aws/credentials`,
//! `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`),
//! chosen per bucket by the agent's operator (`--snapshot-profile
//! s3://BUCKET=PROFILE`), `AWS_PROFILE` for the others. So one agent can
//! copy a snapshot from one provider's bucket to another's, each with its
//! own endpoint and keys, and an operator of convoyctl names a URL, never
//! a credential. Without a profile for a bucket, the standard AWS
//! environment is used as before ([`super::store`]).
//!
//! From a profile: `aws_access_key_id`, `aws_secret_access_key`,
//! `aws_session_token`, `region`, `endpoint_url` (an `http://` endpoint,
//! which the operator wrote, allows plain HTTP: a lab). Static keys only:
//! a profile that gets its keys another way (`role_arn`,
//! `credential_process`, `sso_*`, `web_identity_token_file`) is refused
//! with a message rather than half-understood.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use object_store::aws::AmazonS3ConfigKey;
use object_store::ClientConfigKey;

use super::store::{redacted, S3Options, SnapshotStore, StoreError};

/// The profiles an agent reaches `s3://` buckets with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreProfiles {
    /// Bucket → profile, as the agent's operator set them.
    pub buckets: BTreeMap<String, String>,
    /// The profile of a bucket not mapped (`AWS_PROFILE`), if any.
    pub default: Option<String>,
    /// The shared credentials file.
    pub credentials_file: Option<PathBuf>,
    /// The shared config file.
    pub config_file: Option<PathBuf>,
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// A `--snapshot-profile` that is not `s3://BUCKET=PROFILE`.
    #[error("--snapshot-profile {0:?}: expected s3://BUCKET=PROFILE")]
    Mapping(String),
    /// A shared file could not be read.
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile is in neither file.
    #[error("profile {0:?} is in neither the AWS credentials nor the config file")]
    Missing(String),
    /// The profile gets its keys in a way Convoy does not follow.
    #[error("profile {name:?} gets its keys through {key}, which Convoy does not follow: give it aws_access_key_id and aws_secret_access_key")]
    Unsupported {
        /// The profile.
        name: String,
        /// The setting.
        key: String,
    },
    /// The profile has no static keys.
    #[error("profile {0:?} has no aws_access_key_id and aws_secret_access_key")]
    NoKeys(String),
}

/// Settings that say a profile gets its keys another way.
const INDIRECT: &[&str] = &[
    "role_arn",
    "credential_process",
    "credential_source",
    "source_profile",
    "sso_session",
    "sso_start_url",
    "sso_account_id",
    "web_identity_token_file",
];

impl StoreProfiles {
    /// The shared files and `AWS_PROFILE` from the environment (`AWS_PROFILE`
    /// only when no keys are in the environment: those come first, as for
    /// the AWS tools), with `mappings` (`s3://BUCKET=PROFILE`).
    pub fn from_env(mappings: &[String]) -> Result<StoreProfiles, ProfileError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from);
        let file = |env: &str, name: &str| {
            var(env)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
        };
        let mut p = StoreProfiles {
            buckets: BTreeMap::new(),
            default: var("AWS_ACCESS_KEY_ID")
                .is_none()
                .then(|| var("AWS_PROFILE"))
                .flatten()
                .map(|v| v.to_string_lossy().into_owned()),
            credentials_file: file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            config_file: file("AWS_CONFIG_FILE", "config"),
        };
        for m in mappings {
            let (bucket, profile) = parse_mapping(m)?;
            p.buckets.insert(bucket, profile);
        }
        Ok(p)
    }

    /// Opens snapshot URL `url` as [`SnapshotStore::open`] does, an
    /// `s3://` one with the profile its bucket is mapped to (or the
    /// default profile) if there is one.
    pub fn open(&self, url: &str) -> Result<SnapshotStore, StoreError> {
        let bucket = url
            .strip_prefix("s3://")
            .map(|r| r.split_once('/').map_or(r, |(b, _)| b));
        match bucket.and_then(|b| self.profile_for(b)) {
            Some(name) => {
                let options = self.options(name).map_err(|e| StoreError::Profile {
                    url: redacted(url),
                    why: e.to_string(),
                })?;
                SnapshotStore::open_with_profile(url, name, options)
            }
            None => SnapshotStore::open(url),
        }
    }

    /// The profile bucket `bucket` is reached with, if any.
    pub fn profile_for(&self, bucket: &str) -> Option<&str> {
        self.buckets
            .get(bucket)
            .or(self.default.as_ref())
            .map(String::as_str)
    }

    /// The settings of profile `name`, read from the shared files now.
    pub fn options(&self, name: &str) -> Result<S3Options, ProfileError> {
        let mut found = false;
        let mut settings = BTreeMap::new();
        // The config file first: keys in the credentials file win.
        for (path, header) in [
            (&self.config_file, config_header(name)),
            (&self.credentials_file, name.to_owned()),
        ] {
            let Some(path) = path else { continue };
            if let Some(s) = read_section(path, &header)? {
                found = true;
                settings.extend(s);
            }
        }
        if !found {
            return Err(ProfileError::Missing(name.to_owned()));
        }
        if let Some(k) = settings
            .keys()
            .find(|k| INDIRECT.contains(&k.as_str()) || k.starts_with("sso_"))
        {
            return Err(ProfileError::Unsupported {
                name: name.to_owned(),
                key: k.clone(),
            });
        }
        let (Some(id), Some(secret)) = (
            settings.get("aws_access_key_id"),
            settings.get("aws_secret_access_key"),
        ) else {
            return Err(ProfileError::NoKeys(name.to_owned()));
        };
        let mut config = vec![
            (AmazonS3ConfigKey::AccessKeyId, id.clone()),
            (AmazonS3ConfigKey::SecretAccessKey, secret.clone()),
        ];
        if let Some(t) = settings.get("aws_session_token") {
            config.push((AmazonS3ConfigKey::Token, t.clone()));
        }
        if let Some(r) = settings.get("region") {
            config.push((AmazonS3ConfigKey::Region, r.clone()));
        }
        if let Some(e) = settings.get("endpoint_url") {
            config.push((AmazonS3ConfigKey::Endpoint, e.clone()));
            if e.starts_with("http://") {
                config.push((
                    AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
                    "true".into(),
                ));
            }
        }
        Ok(S3Options {
            config,
            retry: None,
        })
    }
}

/// `s3://BUCKET=PROFILE` as (bucket, profile).
pub fn parse_mapping(m: &str) -> Result<(String, String), ProfileError> {
    let bad = || ProfileError::Mapping(m.to_owned());
    let (url, profile) = m.split_once('=').ok_or_else(bad)?;
    let bucket = url.strip_prefix("s3://").ok_or_else(bad)?;
    let bucket = bucket.trim_end_matches('/');
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if !ok(bucket) || !ok(profile) {
        return Err(bad());
    }
    Ok((bucket.to_owned(), profile.to_owned()))
}

/// A profile's section header in the config file.
fn config_header(name: &str) -> String {
    if name == "default" {
        name.to_owned()
    } else {
        format!("profile {name}")
    }
}

/// The `key = value` settings of section `[header]` of the INI file
/// `path` (`None`: no such section; a missing file has none). Indented
/// lines (a nested service block) and comments are skipped.
fn read_section(
    path: &Path,
    header: &str,
) -> Result<Option<BTreeMap<String, String>>, ProfileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ProfileError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut out: Option<BTreeMap<String, String>> = None;
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = h.split_whitespace().collect::<Vec<_>>().join(" ") == header;
            if inside {
                out.get_or_insert_with(BTreeMap::new);
            }
            continue;
        }
        if !inside {
            continue;
        }
        if let (Some((k, v)), Some(map)) = (line.split_once('='), out.as_mut()) {
            map.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn get(o: &S3Options, k: AmazonS3ConfigKey) -> Option<&str> {
        o.config
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn profiles_come_from_both_shared_files_and_buckets_choose_them() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &creds,
            "# keys\n[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n\
             [eu]\naws_access_key_id=EU\naws_secret_access_key = EUS\naws_session_token = T\n\
             [lost]\nregion = x\n",
        )
        .unwrap();
        std::fs::write(
            &config,
            "[default]\nregion = us-east-1\n[profile eu]\nregion = eu-west-1\n\
             endpoint_url = http://198.18.0.9:9000\ns3 =\n  addressing_style = path\n\
             [profile role]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = default\n\
             [profile sso]\nsso_session = corp\n",
        )
        .unwrap();
        let mut p = StoreProfiles {
            credentials_file: Some(creds),
            config_file: Some(config),
            ..Default::default()
        };
        let (b, n) = parse_mapping("s3://archive-eu=eu").unwrap();
        p.buckets.insert(b, n);
        assert_eq!(p.profile_for("archive-eu"), Some("eu"));
        assert_eq!(p.profile_for("other"), None);
        p.default = Some("default".into());
        assert_eq!(p.profile_for("other"), Some("default"));

        let eu = p.options("eu").unwrap();
        assert_eq!(get(&eu, AmazonS3ConfigKey::AccessKeyId), Some("EU"));
        assert_eq!(get(&eu, AmazonS3ConfigKey::SecretAccessKey), Some("EUS"));
        assert_eq!(get(&eu, AmazonS3ConfigKey::Token), Some("T"));
        assert_eq!(get(&eu, AmazonS3ConfigKey::Region), Some("eu-west-1"));
        assert_eq!(
            get(&eu, AmazonS3ConfigKey::Endpoint),
            Some("http://198.18.0.9:9000")
        );
        assert_eq!(
            get(&eu, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)),
            Some("true")
        );
        let d = p.options("default").unwrap();
        assert_eq!(get(&d, AmazonS3ConfigKey::Region), Some("us-east-1"));
        assert_eq!(get(&d, AmazonS3ConfigKey::Endpoint), None);
        assert_eq!(
            get(&d, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)),
            None
        );
        // Its Debug shows no key.
        assert!(!format!("{eu:?}").contains("EUS"));

        assert!(matches!(p.options("nobody"), Err(ProfileError::Missing(_))));
        assert!(matches!(p.options("lost"), Err(ProfileError::NoKeys(_))));
        for (name, key) in [("role", "role_arn"), ("sso", "sso_session")] {
            match p.options(name) {
                Err(ProfileError::Unsupported { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{other:?}"),
            }
        }
        for bad in [
            "archive=eu",
            "s3://=eu",
            "s3://b=",
            "s3://b",
            "gs://b=eu",
            "s3://b/c=eu",
            "s3://b=e u",
        ] {
            assert!(parse_mapping(bad).is_err(), "{bad}");
        }
    }
}
