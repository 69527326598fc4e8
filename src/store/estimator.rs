//! The estimator thread: fills in the tokens upstream did not report
//! (counting them with the model's vocabulary) before records reach the
//! writer. Everything else passes through in order, so a flush or a shutdown
//! sent here also covers the records still waiting here.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::writer::Msg;
use crate::record::Record;

/// Starts the estimator over `rx`, forwarding everything to `writer`.
pub(super) fn spawn(rx: Receiver<Msg>, writer: Sender<Msg>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tollgate-estimator".into())
        .spawn(move || estimator_loop(rx, writer))
}

fn estimator_loop(rx: Receiver<Msg>, writer: Sender<Msg>) {
    while let Ok(msg) = rx.recv() {
        let msg = match msg {
            Msg::Record(mut r, permit) => {
                estimate(&mut r);
                Msg::Record(r, permit)
            }
            other => other,
        };
        let last = matches!(msg, Msg::Shutdown);
        if writer.send(msg).is_err() || last {
            return;
        }
    }
}

/// Fills in what upstream did not report.
fn estimate(r: &mut Record) {
    let Some(e) = r.estimate.take() else {
        return;
    };
    let model = r.model_or_requested();
    let query = (r.usage.query == 0
        && (e.endpoint.needs_model() || e.endpoint == crate::endpoint::Endpoint::Speech))
        .then(|| crate::tokens::prompt_tokens(e.endpoint, model, &e.request_body));
    let answer = e
        .capture
        .as_ref()
        .filter(|_| r.usage.answer == 0)
        .map(|c| crate::tokens::answer_tokens(model, c));
    if let Some(q) = query {
        r.usage.query = q;
    }
    if let Some(a) = answer {
        r.usage.answer = a;
    }
    r.estimated = true;
}
