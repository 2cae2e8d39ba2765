//! Tandem's claim preparation as the kubelet-plugin crate's [`Driver`]: the crate does the
//! kubelet's wire, [`Preparer`] does the devices.

use std::collections::BTreeMap;

use tandem_kubelet_plugin::{ClaimRef, Driver, PreparedDevice};

use crate::prepare::{PrepareError, Preparer};

impl Driver for Preparer {
    type Error = PrepareError;

    async fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, PrepareError>> {
        Preparer::prepare(self, claims).await
    }

    async fn unprepare(&self, claims: &[ClaimRef]) -> BTreeMap<String, Result<(), PrepareError>> {
        Preparer::unprepare(self, claims).await
    }
}
