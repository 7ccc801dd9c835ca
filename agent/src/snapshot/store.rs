//! Where snapshots live: a URL (`file://DIR`, `s3://BUCKET/PREFIX`) opened
//! as an [`object_store`] store, and the few operations a snapshot needs,
//! each bounded and each error naming the object.
//!
//! Credentials for `s3://` come from the standard AWS environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible service,
//! `AWS_ALLOW_HTTP` for a plain-HTTP one in a lab), or the instance
//! metadata service where there is one, never from a command line; no URL
//! may carry them, and none reaches a log (a URL is shown without its
//! query, which is refused anyway).
//!
//! In-process callers (tests against a lab S3 server) give the same
//! settings as [`S3Options`] to [`SnapshotStore::open_with`] instead: the
//! process environment is shared by every thread and is left alone.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3CopyIfNotExists};

use object_store::path::Path as ObjectPath;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

/// The smallest part of a multipart upload S3 takes (every part but the
/// last): [`SnapshotStore::put_large`] uses no smaller one.
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;

/// How to reach an `s3://` store, given in-process rather than read from
/// the environment: settings in `object_store`'s terms (endpoint, region,
/// keys, `allow_http`…) and, if given, its retry policy. What is not set
/// here is not read from the environment either.
#[derive(Clone, Default)]
pub struct S3Options {
    /// `AmazonS3Builder` settings.
    pub config: Vec<(AmazonS3ConfigKey, String)>,
    /// Retries and backoff (`object_store`'s default when `None`).
    pub retry: Option<RetryConfig>,
}

impl std::fmt::Debug for S3Options {
    // The keys only: the values hold the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field(
                "config",
                &self.config.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("retry", &self.retry)
            .finish()
    }
}

/// Where an `s3://` store's settings come from.
enum S3Source<'a> {
    /// The standard AWS environment ([`AmazonS3Builder::from_env`]).
    Env,
    /// Given in-process.
    Given(&'a S3Options),
    /// A profile of the AWS shared files ([`super::profile`]).
    Profile(&'a str, S3Options),
}

impl S3Source<'_> {
    /// Where the settings came from, to tell two services apart: the
    /// environment, or the endpoint given (never a key).
    fn describe(&self) -> String {
        match self {
            S3Source::Env => "from the environment".into(),
            S3Source::Profile(name, _) => format!("with profile {name}"),
            S3Source::Given(o) => o
                .config
                .iter()
                .find(|(k, _)| *k == AmazonS3ConfigKey::Endpoint)
                .map_or_else(|| "given".into(), |(_, v)| format!("at {v}")),
        }
    }
}

/// Why a snapshot URL could not be opened or an object read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL is not one Convoy takes.
    #[error("snapshot URL {url:?}: {why}")]
    Url {
        /// The URL (as given).
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The local directory could not be made.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The store refused to open (configuration, credentials).
    #[error("{url}: {source}")]
    Open {
        /// The URL.
        url: String,
        /// The library's words.
        #[source]
        source: object_store::Error,
    },
    /// An object operation failed.
    #[error("{url}/{object}: {source}")]
    Object {
        /// The URL.
        url: String,
        /// The object, under the prefix.
        object: String,
        /// The library's words.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The profile chosen for the URL's bucket cannot be used.
    #[error("{url}: {why}")]
    Profile {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// An object is larger than it may be.
    #[error("{url}/{object}: {size} bytes, more than the {max} it may have")]
    TooLarge {
        /// The URL.
        url: String,
        /// The object.
        object: String,
        /// Its size.
        size: u64,
        /// The most it may have.
        max: u64,
    },
}

impl StoreError {
    /// Whether the object asked for is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Object { source, .. }
            if matches!(**source, object_store::Error::NotFound { .. }))
    }
}

/// `url` as it may be shown: nothing after a `?` or `#`, nothing before
/// an `@` (where credentials would be).
pub(super) fn redacted(url: &str) -> String {
    let cut = url.find(['?', '#']).map_or(url, |i| &url[..i]);
    match (cut.find("://"), cut.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &cut[..s], &cut[at + 1..]),
        _ => cut.to_owned(),
    }
}

/// The builder of an `s3://` store. Copy-if-not-exists is done as AWS S3
/// offers it (a one-part multipart copy completed under `If-None-Match`)
/// unless the settings name another way (`AWS_COPY_IF_NOT_EXISTS`).
fn s3_builder(source: &S3Source<'_>) -> AmazonS3Builder {
    let given = match source {
        S3Source::Env => None,
        S3Source::Given(o) => Some(*o),
        S3Source::Profile(_, o) => Some(o),
    };
    let mut b = match given {
        None => AmazonS3Builder::from_env(),
        Some(o) => {
            let mut b = AmazonS3Builder::new();
            for (k, v) in &o.config {
                b = b.with_config(*k, v);
            }
            if let Some(r) = &o.retry {
                b = b.with_retry(r.clone());
            }
            b
        }
    };
    if b.get_config_value(&AmazonS3ConfigKey::CopyIfNotExists)
        .is_none()
    {
        b = b.with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
    }
    b
}

/// A snapshot location: a store and the prefix under it.
#[derive(Clone)]
pub struct SnapshotStore {
    store: Arc<dyn ObjectStore>,
    prefix: Option<ObjectPath>,
    url: String,
    /// `s3://BUCKET` with where its settings came from, for an S3 store:
    /// two stores with the same can copy server-side.
    bucket: Option<String>,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("url", &self.url)
            .finish()
    }
}

impl SnapshotStore {
    /// Opens `url`: `file:///abs/dir` (made, private, if missing) or
    /// `s3://bucket[/prefix]`, configured from the environment.
    pub fn open(url: &str) -> Result<SnapshotStore, StoreError> {
        Self::open_from(url, S3Source::Env)
    }

    /// Opens `url` as [`SnapshotStore::open`] does (the same checks), an
    /// `s3://` one with `options` instead of the environment (a `file://`
    /// one takes none).
    pub fn open_with(url: &str, options: &S3Options) -> Result<SnapshotStore, StoreError> {
        Self::open_from(url, S3Source::Given(options))
    }

    /// Opens `url` as [`SnapshotStore::open`] does, an `s3://` one with
    /// `options`, the settings of profile `name` of the AWS shared files
    /// (see [`super::profile::StoreProfiles::open`]).
    pub fn open_with_profile(
        url: &str,
        name: &str,
        options: S3Options,
    ) -> Result<SnapshotStore, StoreError> {
        Self::open_from(url, S3Source::Profile(name, options))
    }

    fn open_from(url: &str, source: S3Source<'_>) -> Result<SnapshotStore, StoreError> {
        let bad = |why| StoreError::Url {
            url: redacted(url),
            why,
        };
        if url.contains('?') || url.contains('#') || url.contains('@') {
            return Err(bad("no query, fragment or credentials in a snapshot URL"));
        }
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("file:// takes an absolute directory"));
            }
            let path = std::path::Path::new(dir);
            crate::private::create_dir_all(path).map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
            let store =
                object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|source| {
                    StoreError::Open {
                        url: url.to_owned(),
                        source,
                    }
                })?;
            return Ok(SnapshotStore {
                store: Arc::new(store),
                prefix: None,
                url: url.trim_end_matches('/').to_owned(),
                bucket: None,
            });
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("Convoy takes file:///DIR, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX and az://CONTAINER/PREFIX"));
        };
        if !matches!(scheme, "s3" | "gs" | "az") {
            return Err(bad("Convoy takes file:///DIR, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX and az://CONTAINER/PREFIX"));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the URL needs a bucket (a container for az://)"));
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            None
        } else {
            Some(
                ObjectPath::parse(prefix)
                    .map_err(|_| bad("the prefix is not a valid object path"))?,
            )
        };
        // reqwest is built without a crypto provider of its own: it takes
        // the process default, which must be ring (ours).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let opened = |source| StoreError::Open {
            url: url.to_owned(),
            source,
        };
        // Credentials from each service's standard environment (and
        // instance metadata where there is some), never from the URL.
        let service = match scheme {
            "s3" => format!("s3://{bucket} {}", source.describe()),
            other => format!("{other}://{bucket}"),
        };
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" => Arc::new(
                s3_builder(&source)
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(opened)?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(opened)?,
            ),
            _ => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .build()
                    .map_err(opened)?,
            ),
        };
        Ok(SnapshotStore {
            store,
            prefix,
            url: url.trim_end_matches('/').to_owned(),
            bucket: Some(service),
        })
    }

    /// The URL, as shown to operators.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object's path in the store. Object names are made here
    /// (`manifests/…`, `chunks/<hex>`), never taken from a listing.
    fn path(&self, object: &str) -> ObjectPath {
        match &self.prefix {
            Some(p) => ObjectPath::from(format!("{p}/{object}")),
            None => ObjectPath::from(object),
        }
    }

    fn err(&self, object: &str, source: object_store::Error) -> StoreError {
        StoreError::Object {
            url: self.url.clone(),
            object: object.to_owned(),
            source: Box::new(source),
        }
    }

    /// Writes `object` unless it exists: `true` if this call made it.
    pub async fn put_new(&self, object: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(object), PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(object, e)),
        }
    }

    /// Writes `object`, replacing it if it exists.
    pub async fn put(&self, object: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(object), PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.err(object, e))
    }

    /// Reads `object`, refusing one of more than `max` bytes before
    /// reading it.
    pub async fn get(&self, object: &str, max: u64) -> Result<Bytes, StoreError> {
        let r = self
            .store
            .get(&self.path(object))
            .await
            .map_err(|e| self.err(object, e))?;
        if r.meta.size > max {
            return Err(StoreError::TooLarge {
                url: self.url.clone(),
                object: object.to_owned(),
                size: r.meta.size,
                max,
            });
        }
        let b = r.bytes().await.map_err(|e| self.err(object, e))?;
        // A store that sent more than it announced.
        if b.len() as u64 > max {
            return Err(StoreError::TooLarge {
                url: self.url.clone(),
                object: object.to_owned(),
                size: b.len() as u64,
                max,
            });
        }
        Ok(b)
    }

    /// Reads bytes `range` of `object`, refusing a range of more than `max`
    /// bytes before asking for it. A range past the object's end is the
    /// store's error.
    pub async fn get_range(
        &self,
        object: &str,
        range: Range<u64>,
        max: u64,
    ) -> Result<Bytes, StoreError> {
        let len = range.end.saturating_sub(range.start);
        let too_large = |size| StoreError::TooLarge {
            url: self.url.clone(),
            object: object.to_owned(),
            size,
            max,
        };
        if len > max {
            return Err(too_large(len));
        }
        let b = self
            .store
            .get_range(&self.path(object), range)
            .await
            .map_err(|e| self.err(object, e))?;
        if b.len() as u64 > len {
            return Err(too_large(b.len() as u64));
        }
        Ok(b)
    }

    /// Copies `object` of `src` to the same name here unless it exists
    /// here: by the server when both are prefixes of one S3 bucket reached
    /// the same way (no byte passes through this host), otherwise read
    /// (at most `max` bytes) and written. `true` if this call made it.
    pub async fn copy_in(
        &self,
        src: &SnapshotStore,
        object: &str,
        max: u64,
    ) -> Result<bool, StoreError> {
        if self.bucket.is_some() && self.bucket == src.bucket {
            return match self
                .store
                .copy_if_not_exists(&src.path(object), &self.path(object))
                .await
            {
                Ok(()) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(self.err(object, e)),
            };
        }
        let bytes = src.get(object, max).await?;
        self.put_new(object, bytes).await
    }

    /// Whether copies from `src` to here are made by the server.
    pub fn copies_server_side_from(&self, src: &SnapshotStore) -> bool {
        self.bucket.is_some() && self.bucket == src.bucket
    }

    /// Copies `from` to `to` inside the store (the server copies; no byte
    /// passes through this host) unless `to` exists: `true` if this call
    /// made it.
    pub async fn copy_new(&self, from: &str, to: &str) -> Result<bool, StoreError> {
        match self
            .store
            .copy_if_not_exists(&self.path(from), &self.path(to))
            .await
        {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(&format!("{from} -> {to}"), e)),
        }
    }

    /// Writes `object` (replacing it), in parts of `part_size` bytes (at
    /// least [`MIN_PART_SIZE`]) when it is larger than one part, a few
    /// parts in flight at once. Returns how many parts it took (1: one
    /// plain write). A failed multipart upload is aborted, best effort.
    pub async fn put_large(
        &self,
        object: &str,
        bytes: Bytes,
        part_size: usize,
    ) -> Result<usize, StoreError> {
        let part = part_size.max(MIN_PART_SIZE);
        let path = self.path(object);
        if bytes.len() <= part {
            self.store
                .put(&path, PutPayload::from_bytes(bytes))
                .await
                .map_err(|e| self.err(object, e))?;
            return Ok(1);
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.err(object, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        let mut parts = 0;
        let mut at = 0;
        while at < bytes.len() {
            if let Err(e) = w.wait_for_capacity(PART_CONCURRENCY).await {
                let _ = w.abort().await;
                return Err(self.err(object, e));
            }
            let end = bytes.len().min(at + part);
            w.put(bytes.slice(at..end));
            parts += 1;
            at = end;
        }
        // `finish` aborts the upload itself when a part or the completion
        // fails.
        w.finish().await.map_err(|e| self.err(object, e))?;
        Ok(parts)
    }

    /// The names (under the prefix) of the objects under `dir/`.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let base = self.path(dir);
        let mut out = Vec::new();
        let mut s = self.store.list(Some(&base));
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| self.err(dir, e))?;
            let full = m.location.as_ref();
            let rel = match &self.prefix {
                Some(p) => full
                    .strip_prefix(p.as_ref())
                    .map(|r| r.trim_start_matches('/')),
                None => Some(full),
            };
            if let Some(r) = rel {
                out.push(r.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes `object` (gone already is fine).
    pub async fn delete(&self, object: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(object)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(object, e)),
        }
    }
}
