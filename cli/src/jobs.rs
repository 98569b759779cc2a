//! `offload submit`, `wait`, `jobs` and `cancel`: jobs (`offload.v1.Jobs`)
//! from the command line.

use std::io::IsTerminal;

use anyhow::bail;
use offload_proto::offload::v1::{
    CancelJobRequest, Job, JobState, ListJobsRequest, SubmitJobRequest, WaitJobRequest, jobs_client::JobsClient,
};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{Credentials, OutputArgs, WorkArgs, progress_bar, status_error, write_output};

type Client = JobsClient<InterceptedService<Channel, Credentials>>;

/// A Jobs client over `channel`.
pub fn client(channel: Channel, credentials: Credentials) -> Client {
    JobsClient::with_interceptor(channel, credentials).max_decoding_message_size(usize::MAX)
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Task name, e.g. primes.count.
    task: String,
    #[command(flatten)]
    work: WorkArgs,
    /// Submits with the same key return the same job (a retried submit does
    /// not run the work twice).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Wait for the job and write its output.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The job's id.
    id: String,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for JobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Queued => JobState::Queued,
            StateArg::Running => JobState::Running,
            StateArg::Succeeded => JobState::Succeeded,
            StateArg::Failed => JobState::Failed,
            StateArg::Cancelled => JobState::Cancelled,
        }
    }
}

fn state_name(job: &Job) -> &'static str {
    JobState::try_from(job.state).map_or("?", |s| s.as_str_name().trim_start_matches("JOB_STATE_"))
}

pub async fn submit(client: &mut Client, args: SubmitArgs) -> anyhow::Result<()> {
    let request = args.work.request(SubmitJobRequest {
        task: args.task.clone(),
        input: args.work.input()?,
        params: args.work.params(),
        mode: args.work.mode() as i32,
        idempotency_key: args.key.clone().unwrap_or_default(),
    })?;
    let job = client.submit(request).await.map_err(status_error)?.into_inner();
    if !args.wait {
        println!("{}", job.id);
        return Ok(());
    }
    eprintln!("job {}", job.id);
    wait(client, WaitArgs { id: job.id, out: args.out }).await
}

pub async fn wait(client: &mut Client, args: WaitArgs) -> anyhow::Result<()> {
    let mut changes = client.wait(WaitJobRequest { id: args.id.clone() }).await.map_err(status_error)?.into_inner();
    let bar = (!args.out.no_progress && std::io::stderr().is_terminal()).then(progress_bar);
    let mut last = None;
    while let Some(job) = changes.message().await.map_err(status_error)? {
        if let Some(bar) = &bar {
            bar.set_prefix(state_name(&job).to_lowercase());
            bar.set_position((job.progress * 1000.0) as u64);
            bar.set_message(job.progress_message.clone());
        }
        last = Some(job);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let Some(job) = last else { bail!("the server closed the wait without a job") };
    if job.state == JobState::Succeeded as i32 {
        return write_output(&job.output, args.out.output.as_deref(), args.out.hex);
    }
    let error = job.error.clone().unwrap_or_default();
    let code = tonic::Code::from(error.code);
    bail!("job {} {}: {code:?}: {}", job.id, state_name(&job).to_lowercase(), error.message)
}

pub async fn list(client: &mut Client, args: ListArgs) -> anyhow::Result<()> {
    let state = args.state.map_or(JobState::Unspecified, JobState::from) as i32;
    let request = ListJobsRequest { state, page_size: args.limit, page_token: String::new() };
    let jobs = client.list(request).await.map_err(status_error)?.into_inner().jobs;
    for job in jobs {
        let created = job.create_time.map_or(0, |t| t.seconds);
        println!(
            "{}  {:<9}  {:>3.0}%  attempts {}  created {}  {}",
            job.id,
            state_name(&job),
            job.progress * 100.0,
            job.attempts,
            created,
            job.task
        );
    }
    Ok(())
}

pub async fn cancel(client: &mut Client, id: &str) -> anyhow::Result<()> {
    let job = client.cancel(CancelJobRequest { id: id.to_string() }).await.map_err(status_error)?.into_inner();
    println!("{} {}", job.id, state_name(&job));
    Ok(())
}
