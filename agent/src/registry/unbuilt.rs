//! The registry's store in a build without the `registry` feature: it
//! cannot be made, so nothing else here is ever called.

use std::time::Duration;

use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::registry::{AgentRecord, OwnerRecord};

use super::{Contents, RegistryConfig, RegistryError};

/// No value of this type exists.
pub(super) enum Store {}

impl Store {
    pub(super) async fn connect(_: &RegistryConfig) -> Result<Store, RegistryError> {
        Err(RegistryError::NotBuilt)
    }

    pub(super) async fn get_owner(
        &self,
        _: &str,
        _: &VmName,
        _: Duration,
    ) -> Result<Option<(OwnerRecord, i64)>, RegistryError> {
        match *self {}
    }

    pub(super) async fn create(
        &self,
        _: &str,
        _: &OwnerRecord,
        _: Duration,
    ) -> Result<Option<(OwnerRecord, i64)>, RegistryError> {
        match *self {}
    }

    pub(super) async fn swap(
        &self,
        _: &str,
        _: i64,
        _: &OwnerRecord,
        _: Duration,
    ) -> Result<Option<Option<(OwnerRecord, i64)>>, RegistryError> {
        match *self {}
    }

    pub(super) async fn delete_if(
        &self,
        _: &str,
        _: &VmName,
        _: i64,
        _: Duration,
    ) -> Result<(), RegistryError> {
        match *self {}
    }

    pub(super) async fn list(&self, _: &str, _: Duration) -> Result<Contents, RegistryError> {
        match *self {}
    }

    pub(super) async fn register(
        &self,
        _: &str,
        _: &AgentRecord,
        _: Duration,
        _: Duration,
    ) -> Result<(), RegistryError> {
        match *self {}
    }

    pub(super) async fn renew(&self, _: Duration) -> Result<bool, RegistryError> {
        match *self {}
    }

    pub(super) async fn leave(&self, _: &str, _: &SpiffeId, _: Duration) {
        match *self {}
    }
}
