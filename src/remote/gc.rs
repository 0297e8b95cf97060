//! Placeholder until the collection lands.
use super::{RemoteResult, RemoteStore};
pub struct GcReport;
impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nothing collected")
    }
}
pub fn collect(_store: &RemoteStore, _dry_run: bool) -> RemoteResult<GcReport> {
    Ok(GcReport)
}
