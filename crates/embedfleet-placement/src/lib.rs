//! Placement: which of the catalogue's models go on which device, at which dtype, so that each
//! device holds what it is given.
//!
//! The GPU fleet runs one worker process per device (`embedfleet worker --device cuda:N`). A plan
//! answers, before anything is loaded: how much memory each model needs at a dtype
//! ([`memory`]), which devices exist ([`devices`]), and where each model (and each replica) goes
//! ([`plan`]). [`render`] prints a plan as a table, as worker command lines and as the Helm
//! values block of the chart's `workerGroups`.
//!
//! Everything here is arithmetic on the catalogue and the upstream configs' shapes: it runs on a
//! laptop, and its estimates are checked against real loads only where a GPU has been available
//! (see docs/architecture.md, "Placement").

pub mod devices;
pub mod memory;
pub mod plan;
pub mod render;
pub mod shapes;

pub use devices::{parse_devices, Device};
pub use embedfleet_models::dtype::{self, Dtype};
pub use memory::{MemoryModel, ModelNeed};
pub use plan::{plan, Assignment, DevicePlan, Plan, PlanError, PlanRequest};
