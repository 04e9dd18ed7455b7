//! The agent: the long-running process that runs the scheduled jobs around the peak calendar.
//!
//! What exists so far is its pure core, which reads no clock and does no I/O:
//! - [`schedule`]: when each schedule falls due, the decision for a run (start, defer to the
//!   end of a blackout window, skip), missed runs after downtime, and the state that keeps a
//!   job from overlapping itself;
//! - [`calendar`]: when the blackout windows are open and which databases they cover;
//! - [`local_time`]: the daylight-saving rules shared by both;
//! - [`plan`]: the report of `invsync agent --check`, the next runs of every schedule.
//!
//! And what lets two agents share a deployment: [`lease`], which agent runs each pipeline and
//! job (a lease row in PostgreSQL with an epoch that fences writes), and the take-over of a
//! pipeline from a holder that lost its lease.
//!
//! Every instant is a `DateTime<Utc>`; wall-clock times exist only in the configuration and
//! in rendered reports.

pub mod calendar;
pub mod lease;
pub mod local_time;
pub mod plan;
pub mod schedule;
