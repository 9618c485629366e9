//! A worker made of bare protocol messages: it joins and proves itself honestly, then the
//! test drives its `Work` stream message by message (to misbehave, or to check the
//! coordinator's half of the protocol exactly).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use es_core::noise::NoiseSource;
use es_core::train::{Dataset, golden_task};
use es_data::mnist::Mnist;
use es_data::noise_file::{Check, NoiseFile};
use es_proto::pb::coordinator_client::CoordinatorClient;
use es_proto::pb::{self, coordinator_message, join_reply::Outcome};
use es_proto::{GoldenEval, GoldenProof, NoiseSpec, RunSpec};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A client of the coordinator at `addr` ("http://host:port"), retried while it starts.
pub async fn client(addr: &str) -> CoordinatorClient<Channel> {
    for _ in 0..400 {
        if let Ok(c) = CoordinatorClient::connect(addr.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator at {addr} did not come up");
}

/// The golden proof an honest worker of `accepted`'s run would send (its noise table
/// cached under `cache`).
pub fn honest_proof(accepted: &pb::JoinAccepted, data: &Mnist, cache: &Path) -> GoldenProof {
    let spec = RunSpec::try_from(accepted.spec.clone().unwrap()).unwrap();
    let noise = match spec.noise {
        NoiseSpec::Table { noise_seed, len } => NoiseSource::Table(
            NoiseFile::open_or_create(cache, noise_seed, len, Check::Quick)
                .unwrap()
                .into_table(),
        ),
        NoiseSpec::Stream => NoiseSource::Stream,
    };
    let train = Dataset {
        images: &data.train.images,
        labels: &data.train.labels,
    };
    let task = accepted.golden.unwrap();
    let [center, plus, minus] = golden_task(
        &spec.net,
        &spec.es,
        spec.run_seed,
        &noise,
        train,
        task.generation,
        task.index,
        es_kernel::Kernel::detect().unwrap(),
    )
    .unwrap()
    .map(|g| GoldenEval::new(&g.evaluation, &g.logits));
    GoldenProof {
        center,
        plus,
        minus,
    }
}

/// A join request of one thread for `data`, offering nothing beyond the basics (no noise
/// sums, no relay, no carried credits).
pub fn join_request(data: &Mnist, name: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: es_proto::PROTOCOL_VERSION,
        run_id: String::new(),
        data_digest: data.digest.to_vec(),
        threads: 1,
        name: name.into(),
        kernel: "avx512".into(),
        sums_noise: false,
        relay_port: 0,
        relay_host: String::new(),
        carried_credits: false,
        hub: false,
        join_key: 0,
    }
}

/// A joined and honestly proven worker with its `Work` stream open.
pub struct RawWorker {
    pub accepted: pb::JoinAccepted,
    pub out: mpsc::Sender<pb::WorkerMessage>,
    pub inbound: tonic::Streaming<pb::CoordinatorMessage>,
    /// The proof it sent (a second one is a protocol error).
    pub prove: pb::Prove,
}

impl RawWorker {
    /// Joins the coordinator at `addr` with `join` (retried until it is up), proves itself
    /// and opens its stream; the first message that comes back is still unread.
    pub async fn join(
        addr: &str,
        join: pb::JoinRequest,
        data: &Arc<Mnist>,
        cache: &Path,
    ) -> RawWorker {
        let mut client = client(addr).await;
        let accepted = loop {
            match client.join(join.clone()).await {
                Ok(reply) => match reply.into_inner().outcome.unwrap() {
                    Outcome::Accepted(a) => break a,
                    Outcome::Refused(r) => panic!("refused at join: {}", r.message),
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let proof = {
            let (accepted, data, cache) = (accepted.clone(), Arc::clone(data), cache.to_owned());
            tokio::task::spawn_blocking(move || honest_proof(&accepted, &data, &cache))
                .await
                .unwrap()
        };
        let (out, outbox) = mpsc::channel::<pb::WorkerMessage>(64);
        let prove = pb::Prove::new(&accepted.run_id, accepted.worker_id, &proof, None);
        out.send(prove.clone().into()).await.unwrap();
        let inbound = client
            .work(ReceiverStream::new(outbox))
            .await
            .unwrap()
            .into_inner();
        RawWorker {
            accepted,
            out,
            inbound,
            prove,
        }
    }

    /// The next message's kind, or `None` when nothing comes within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<coordinator_message::Kind> {
        match tokio::time::timeout(limit, self.inbound.next()).await {
            Err(_) => None,
            Ok(message) => Some(
                message
                    .expect("the stream is open")
                    .expect("no stream error")
                    .kind
                    .expect("a kind"),
            ),
        }
    }

    /// Sends `message` on the stream.
    pub async fn send(&self, message: impl Into<pb::WorkerMessage>) {
        self.out.send(message.into()).await.unwrap();
    }
}
