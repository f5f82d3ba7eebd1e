//! The HTTP/1.1 fast path.
//!
//! Through hyper, every request costs a header map, a hop between the
//! server connection's task and the client connection's task, and a pool
//! checkout. A proxy passing HTTP/1.1 through needs none of that. This
//! path parses the request head in place (httparse), decides with the same
//! [`Forwarder::plan`] as the hyper path, and writes head and body to a
//! pooled upstream connection in one write. It then relays the response
//! head and body as the response frames them, all in the task that reads
//! the client.
//!
//! What it does not handle itself it hands to the hyper path, with the
//! bytes it has read:
//! - HTTP/1.0;
//! - chunked request bodies, and bodies over 64 KiB;
//! - upgrades, `Expect`, absolute-form targets;
//! - heads httparse refuses (hyper answers 400).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::balance::Outcome;
use crate::config::RetryPolicy;
use crate::http::{
    CLIENT_ID, Forwarder, Peer, Plan, RETRYABLE_BODY, RequestView, forwarded_for, is_idempotent,
    judge,
};
use crate::io::Stream;
use crate::metrics::Label;
use crate::upstream::{Endpoint, Service};

/// The largest request or response head.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;
/// Response bytes gathered before they are written to the client.
const FLUSH_AT: usize = 64 * 1024;

/// How a connection left the fast path.
pub(crate) enum Ended<T> {
    /// Closed, or drained.
    Closed,
    /// A request the hyper path must serve: the bytes read so far (from
    /// the start of that request), and the connection.
    Handoff(Bytes, T),
}

/// Serves HTTP/1.1 requests on `io` until the connection ends, draining
/// starts while it is idle, or a request needs the hyper path.
/// `current` gives the forwarder for each request (routes and policy as
/// they are when it arrives).
pub(crate) async fn serve<T>(
    mut io: T,
    peer: &Peer,
    current: impl Fn() -> Arc<Forwarder>,
    drain: &mut watch::Receiver<bool>,
) -> Ended<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut head = Head::default();
    let mut scratch = Scratch::default();
    // The request as sent upstream.
    let mut outgoing = Vec::new();
    loop {
        // The head.
        loop {
            if !buf.is_empty() {
                match head.parse(&buf) {
                    Parsed::Complete => break,
                    Parsed::Partial if buf.len() < MAX_HEAD => {}
                    Parsed::Partial | Parsed::Unsupported => {
                        return Ended::Handoff(buf.freeze(), io);
                    }
                }
            }
            buf.reserve(4096);
            let read = if buf.is_empty() {
                tokio::select! {
                    r = io.read_buf(&mut buf) => r,
                    () = crate::server::drained(drain) => return Ended::Closed,
                }
            } else {
                io.read_buf(&mut buf).await
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Ended::Closed;
            }
        }
        // The body: always whole (larger ones go to the hyper path).
        let total = head.len + head.content_length;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            if !matches!(io.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return Ended::Closed;
            }
        }
        let started = Instant::now();
        let forwarder = current();
        let view = View {
            buf: &buf,
            head: &head,
        };
        let reply = match forwarder.plan(&view, peer) {
            Plan::Answer {
                route,
                service,
                status,
                message,
            } => {
                let close = head.close || *drain.borrow();
                let keep = answer(&mut io, &mut scratch.out, status, &message, close).await;
                Reply {
                    route,
                    service,
                    backend: Label::default(),
                    status: status.as_u16(),
                    keep,
                }
            }
            Plan::Forward {
                route,
                service,
                retry,
                timeout,
            } => {
                outgoing.clear();
                write_request(
                    &mut outgoing,
                    &buf[..total],
                    &head,
                    peer,
                    forwarder.forwarded_for,
                );
                let request = Request {
                    bytes: &outgoing,
                    idempotent: is_idempotent_str(view.method()),
                    head: view.method() == "HEAD",
                    close: head.close,
                    retry,
                    timeout,
                };
                let (backend, status, keep) = forward(
                    &forwarder,
                    &service,
                    &request,
                    (&mut io, &mut buf),
                    &mut scratch,
                    drain,
                )
                .await;
                Reply {
                    route,
                    service: service.label.clone(),
                    backend,
                    status,
                    keep,
                }
            }
        };
        forwarder.observe(
            reply.route,
            reply.service,
            reply.backend,
            peer,
            reply.status,
            started,
        );
        buf.advance(total);
        if !reply.keep {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// Buffers a connection reuses from request to request.
#[derive(Default)]
struct Scratch {
    /// Response bytes on their way to the client.
    out: Vec<u8>,
    /// Bytes read from the upstream.
    upstream: BytesMut,
    /// Endpoints tried for the current request.
    tried: Vec<usize>,
}

/// A request, ready to send.
struct Request<'a> {
    bytes: &'a [u8],
    idempotent: bool,
    /// `HEAD`: the response has no body whatever it says.
    head: bool,
    /// The client asked to close after this response.
    close: bool,
    retry: RetryPolicy,
    timeout: Duration,
}

/// How a request ended, for metrics and the connection.
struct Reply {
    route: Label,
    service: Label,
    backend: Label,
    status: u16,
    /// The client connection can carry another request.
    keep: bool,
}

/// The status recorded for a request whose client went away before the
/// answer (nginx's "client closed request"); nothing is sent.
const CLIENT_GONE: u16 = 499;

/// Sends `request` to an endpoint of `service` (again on another after a
/// failure, where that is safe) and relays the answer to the client
/// (`down`; bytes it sends meanwhile go to `pending`). Returns the
/// answering endpoint, the status, and whether `down` can carry another
/// request.
async fn forward<D>(
    forwarder: &Forwarder,
    service: &Service,
    request: &Request<'_>,
    (down, pending): (&mut D, &mut BytesMut),
    scratch: &mut Scratch,
    drain: &watch::Receiver<bool>,
) -> (Label, u16, bool)
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    service.deposit();
    scratch.tried.clear();
    let resend_allowed = request.idempotent || request.retry.non_idempotent;
    loop {
        let Some(pick) = service.pick(&scratch.tried) else {
            let message = format!("service {} has no endpoints", service.name);
            let status = StatusCode::SERVICE_UNAVAILABLE;
            let keep = answer(down, &mut scratch.out, status, &message, request.close).await;
            return (Label::default(), status.as_u16(), keep);
        };
        scratch.tried.push(pick.index);
        let endpoint = pick.endpoint();
        scratch.out.clear();
        scratch.upstream.clear();
        let sent = tokio::time::Instant::now();
        let close = request.close || *drain.borrow();
        let result = exchange(
            endpoint,
            request,
            close,
            sent,
            &mut scratch.upstream,
            (&mut *down, &mut *pending),
            &mut scratch.out,
        )
        .await;
        let rtt = sent.elapsed();
        if matches!(&result, Err(f) if f.cause == Cause::ClientGone) {
            // Dropping the upstream connection tells the app; the pick
            // ends abandoned, neither success nor failure.
            return (Label::default(), CLIENT_GONE, false);
        }
        // Whether sending again is safe: the request never reached the
        // endpoint, or it is idempotent (or the route opted in).
        let (outcome, resend_safe, reply) = match result {
            Ok((conn, head)) => {
                let (outcome, safe) = judge(head.status, resend_allowed);
                (outcome, safe, Ok((conn, head)))
            }
            Err(Failed {
                cause: Cause::Timeout,
                ..
            }) => (
                Outcome::Failure,
                resend_allowed,
                Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("no response in {:?}", request.timeout),
                )),
            ),
            Err(Failed { sent, message, .. }) => (
                Outcome::Failure,
                !sent || resend_allowed,
                Err((StatusCode::BAD_GATEWAY, message)),
            ),
        };
        forwarder.settle(pick, rtt, outcome);
        if forwarder.try_again(
            service,
            outcome,
            resend_safe,
            scratch.tried.len(),
            request.retry,
        ) {
            continue;
        }
        match reply {
            Err((status, error)) => {
                let message = format!("upstream {} ({}): {error}", endpoint.addr, service.name);
                tracing::debug!(error = %message, "Upstream failed");
                let keep = answer(down, &mut scratch.out, status, &message, request.close).await;
                return (Label::default(), status.as_u16(), keep);
            }
            Ok((mut conn, head)) => {
                let relayed = relay(
                    head.framing,
                    &mut conn,
                    &mut scratch.upstream,
                    down,
                    &mut scratch.out,
                )
                .await;
                let keep = match relayed {
                    Ok(clean) => {
                        if clean && head.reusable {
                            endpoint.checkin(conn);
                        }
                        !head.closes
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, endpoint = %endpoint.addr, "Response relay failed");
                        false
                    }
                };
                return (endpoint.label.clone(), head.status, keep);
            }
        }
    }
}

/// The proxy's own answer to a request (`close`: and the connection
/// ends). Returns whether the connection can carry another request.
async fn answer<D: AsyncWrite + Unpin>(
    down: &mut D,
    out: &mut Vec<u8>,
    status: StatusCode,
    message: &str,
    close: bool,
) -> bool {
    out.clear();
    write_text(out, status, message, close);
    send(down, out).await.is_ok() && !close
}

/// How long the app may take to answer before the client is watched for
/// going away. Most answers come sooner, and they then cost no read of the
/// client beyond the request (that read, usually finding nothing, would be
/// one more system call per request).
const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(20);

/// Whether [`exchange`] watches the client.
#[derive(Clone, Copy)]
enum Watch {
    NotYet,
    Now,
    /// No more: it sent more (a pipelined request) instead of going away.
    Done,
}

/// An attempt that got no response.
struct Failed {
    /// Some of the request may have reached the endpoint.
    sent: bool,
    cause: Cause,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The endpoint: no connection, a reset, a bad or missing response.
    Upstream,
    /// No response head by the request's deadline.
    Timeout,
    /// The client went away meanwhile: nobody is left to answer.
    ClientGone,
}

/// One attempt: a connection (pooled or new), the request written, the
/// response head read, all within the request's timeout from `sent`. A
/// 1xx response goes to `down` as
/// it arrives (103 Early Hints are only useful ahead of the final
/// response); the final head is left in `out` as the client gets it.
///
/// Once the head has been awaited for [`WATCH_CLIENT_AFTER`], the client
/// is watched, as hyper's server does: its end (EOF or an error) ends the
/// attempt at once, so a client that gave up does not hold an upstream
/// connection until the app answers. Bytes it sends meanwhile (a
/// pipelined request) go to `pending`, and the watch stops there, so a
/// client cannot make the proxy buffer more than one read ahead.
async fn exchange<D: AsyncRead + AsyncWrite + Unpin>(
    endpoint: &Endpoint,
    request: &Request<'_>,
    close: bool,
    sent: tokio::time::Instant,
    upstream: &mut BytesMut,
    (down, pending): (&mut D, &mut BytesMut),
    out: &mut Vec<u8>,
) -> Result<(Stream, ResponseHead), Failed> {
    let deadline = sent + request.timeout;
    let failed = |cause: Cause, message: String| Failed {
        sent: true,
        cause,
        message,
    };
    let timed_out = || failed(Cause::Timeout, String::new());
    let opened = async {
        let mut conn = match endpoint.checkout() {
            Some(c) => c,
            None => endpoint.connector.connect().await.map_err(|e| Failed {
                sent: false,
                cause: Cause::Upstream,
                message: e.to_string(),
            })?,
        };
        send(&mut conn, request.bytes)
            .await
            .map_err(|e| failed(Cause::Upstream, format!("sending the request: {e}")))?;
        Ok(conn)
    };
    // A pooled connection that takes the whole request at once arms no
    // timer here.
    let mut conn = tokio::time::timeout_at(deadline, opened)
        .await
        .map_err(|_| timed_out())??;
    // One timer for both: the watch's start, then the deadline.
    let watch_from = tokio::time::Instant::now() + WATCH_CLIENT_AFTER;
    let timer = tokio::time::sleep_until(deadline.min(watch_from));
    tokio::pin!(timer);
    let mut watch = Watch::NotYet;
    loop {
        if !out.is_empty() {
            // Interim responses only: the final head is not read yet. A
            // client that has gone shows when the final response is
            // written, so a failure here is left to that write.
            let _ = tokio::time::timeout_at(deadline, send(down, out)).await;
            out.clear();
        }
        upstream.reserve(4096);
        if matches!(watch, Watch::Now) {
            pending.reserve(4096);
        }
        let read = tokio::select! {
            biased;
            r = conn.read_buf(upstream) => r,
            r = down.read_buf(pending), if matches!(watch, Watch::Now) => {
                if !matches!(r, Ok(n) if n > 0) {
                    return Err(failed(Cause::ClientGone, "the client went away".into()));
                }
                watch = Watch::Done;
                continue;
            }
            () = &mut timer => {
                if timer.deadline() >= deadline {
                    return Err(timed_out());
                }
                watch = Watch::Now;
                timer.as_mut().reset(deadline);
                continue;
            }
        };
        match read {
            Ok(0) => {
                return Err(failed(
                    Cause::Upstream,
                    "closed the connection before responding".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(failed(
                    Cause::Upstream,
                    format!("reading the response: {e}"),
                ));
            }
        }
        loop {
            match parse_response(upstream, request.head, close, out)
                .map_err(|e| failed(Cause::Upstream, e))?
            {
                ResponseParse::Partial => break,
                ResponseParse::Interim(len) => upstream.advance(len),
                ResponseParse::Final(head) => {
                    upstream.advance(head.len);
                    return Ok((conn, head));
                }
            }
        }
    }
}

/// Copies the response body from `up` to `down` as `framing` delimits it;
/// `upstream` holds the bytes already read, `out` the head not yet
/// written. Returns whether the upstream connection ended cleanly (the
/// body whole and nothing after it), so it can carry another request.
async fn relay<U, D>(
    framing: Framing,
    up: &mut U,
    upstream: &mut BytesMut,
    down: &mut D,
    out: &mut Vec<u8>,
) -> std::io::Result<bool>
where
    U: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let mut relay = Relay {
        up,
        upstream,
        down,
        out,
    };
    match framing {
        Framing::Length(n) => relay.copy(n).await?,
        Framing::Chunked => loop {
            let line = relay.line().await?;
            let size = chunk_size(&relay.upstream[..line])?;
            relay.copy(line as u64).await?;
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    let line = relay.line().await?;
                    relay.copy(line as u64).await?;
                    if line <= 2 {
                        break;
                    }
                }
                break;
            }
            relay.copy(size).await?;
            let end = relay.line().await?;
            if end > 2 {
                return Err(std::io::Error::other("chunk longer than its size"));
            }
            relay.copy(end as u64).await?;
        },
        Framing::UntilClose => {
            loop {
                let n = relay.upstream.len() as u64;
                relay.copy(n).await?;
                if !relay.fill().await? {
                    break;
                }
            }
            relay.flush().await?;
            return Ok(false);
        }
    }
    relay.flush().await?;
    Ok(relay.upstream.is_empty())
}

struct Relay<'a, U, D> {
    up: &'a mut U,
    upstream: &'a mut BytesMut,
    down: &'a mut D,
    out: &'a mut Vec<u8>,
}

impl<U: AsyncRead + Unpin, D: AsyncWrite + Unpin> Relay<'_, U, D> {
    /// Reads more from upstream; false at its end.
    async fn fill(&mut self) -> std::io::Result<bool> {
        // Whatever is gathered goes out before waiting on the upstream.
        self.flush().await?;
        self.upstream.reserve(16 * 1024);
        Ok(self.up.read_buf(self.upstream).await? > 0)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            send(self.down, self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Moves `n` bytes from upstream to the client.
    async fn copy(&mut self, mut n: u64) -> std::io::Result<()> {
        loop {
            let take = n.min(self.upstream.len() as u64) as usize;
            self.out.extend_from_slice(&self.upstream[..take]);
            self.upstream.advance(take);
            n -= take as u64;
            if self.out.len() >= FLUSH_AT {
                self.flush().await?;
            }
            if n == 0 {
                return Ok(());
            }
            if !self.fill().await? {
                return Err(std::io::Error::other("upstream closed mid-body"));
            }
        }
    }

    /// The length of the next line in `upstream`, with its line end.
    async fn line(&mut self) -> std::io::Result<usize> {
        loop {
            if let Some(i) = self.upstream.iter().position(|&b| b == b'\n') {
                return Ok(i + 1);
            }
            if self.upstream.len() > MAX_LINE {
                return Err(std::io::Error::other("chunk line too long"));
            }
            if !self.fill().await? {
                return Err(std::io::Error::other("upstream closed mid-body"));
            }
        }
    }
}

/// Writes all of `bytes` and flushes them: a TLS stream may hold back
/// what the socket did not take at once.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// The size of a chunk from its size line (`1a;ext=1\r\n`).
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let digits = line
        .split(|&b| b == b';' || b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let digits = digits.trim_ascii();
    let bad = || std::io::Error::other("bad chunk size");
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad())?;
    u64::from_str_radix(text, 16).map_err(|_| bad())
}

/// A parsed request head: where its parts lie in the connection's buffer.
#[derive(Default)]
struct Head {
    /// Bytes up to the body.
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    /// Name and value of each field.
    fields: Vec<((usize, usize), (usize, usize))>,
    /// The values of the `Connection` fields (the hop-by-hop fields they
    /// name are not sent on).
    connection: Vec<(usize, usize)>,
    content_length: usize,
    /// `Connection: close`.
    close: bool,
}

enum Parsed {
    Complete,
    Partial,
    /// For the hyper path.
    Unsupported,
}

impl Head {
    fn parse(&mut self, buf: &[u8]) -> Parsed {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Unsupported,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::Unsupported;
        };
        if !target.starts_with('/') {
            return Parsed::Unsupported;
        }
        self.len = len;
        self.method = span(buf, method.as_bytes());
        self.target = span(buf, target.as_bytes());
        self.fields.clear();
        self.connection.clear();
        self.close = false;
        let mut length = None;
        for h in req.headers.iter() {
            let name = h.name;
            if ["transfer-encoding", "upgrade", "expect"]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
            {
                return Parsed::Unsupported;
            }
            if name.eq_ignore_ascii_case("content-length") {
                match digits(h.value) {
                    Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                    _ => return Parsed::Unsupported,
                }
            }
            if name.eq_ignore_ascii_case("connection") {
                self.connection.push(span(buf, h.value));
                for token in tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::Unsupported;
                    }
                }
            }
            self.fields
                .push((span(buf, name.as_bytes()), span(buf, h.value)));
        }
        match length {
            Some(n) if n > RETRYABLE_BODY => Parsed::Unsupported,
            n => {
                self.content_length = n.unwrap_or(0) as usize;
                Parsed::Complete
            }
        }
    }

    fn fields<'a>(&'a self, buf: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        self.fields
            .iter()
            .map(move |&(n, v)| (&buf[n.0..n.1], &buf[v.0..v.1]))
    }
}

/// Where `part` (a slice of `buf`) lies in `buf`.
fn span(buf: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start, start + part.len())
}

/// A decimal length, nothing else.
fn digits(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The comma-separated tokens of a field value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a field describes one connection, not the message (RFC 9110
/// section 7.6.1), given the values of the message's Connection fields.
/// `Transfer-Encoding` is kept: bodies are relayed as framed.
fn hop_by_hop<'a>(name: &[u8], value: &[u8], connection: impl Iterator<Item = &'a [u8]>) -> bool {
    const FIXED: [&[u8]; 6] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"upgrade",
    ];
    FIXED.iter().any(|n| name.eq_ignore_ascii_case(n))
        || (name.eq_ignore_ascii_case(b"te") && !value.eq_ignore_ascii_case(b"trailers"))
        || connection
            .flat_map(tokens)
            .any(|t| t.eq_ignore_ascii_case(name))
}

/// The request as the upstream gets it: without hop-by-hop fields, with
/// the caller named where the forwarder says so, and its body.
fn write_request(out: &mut Vec<u8>, buf: &[u8], head: &Head, peer: &Peer, tell_app: bool) {
    out.extend_from_slice(&buf[head.method.0..head.method.1]);
    out.push(b' ');
    out.extend_from_slice(&buf[head.target.0..head.target.1]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let connection = || head.connection.iter().map(|&(a, b)| &buf[a..b]);
    let mut earlier = None;
    for (name, value) in head.fields(buf) {
        if hop_by_hop(name, value, connection()) {
            continue;
        }
        if tell_app && name.eq_ignore_ascii_case(CLIENT_ID.as_bytes()) {
            continue;
        }
        if tell_app && name.eq_ignore_ascii_case(b"x-forwarded-for") {
            earlier.get_or_insert(value);
            continue;
        }
        field(out, name, value);
    }
    if tell_app {
        if let Some(id) = peer.client_id() {
            field(out, CLIENT_ID.as_bytes(), id.as_bytes());
        }
        let earlier = earlier.and_then(|v| std::str::from_utf8(v).ok());
        if let Some(v) = forwarded_for(earlier, peer) {
            field(out, b"x-forwarded-for", v.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[head.len..]);
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A plain-text answer from the proxy itself, as the hyper path gives it.
fn write_text(out: &mut Vec<u8>, status: StatusCode, message: &str, close: bool) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-skiff-proxy-error: 1\r\ncontent-length: {}\r\n{}\r\n{message}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        message.len() + 1,
        if close { "connection: close\r\n" } else { "" },
    );
}

fn is_idempotent_str(method: &str) -> bool {
    method
        .parse::<hyper::Method>()
        .is_ok_and(|m| is_idempotent(&m))
}

/// A request head as routing and authorization read it.
struct View<'a> {
    buf: &'a [u8],
    head: &'a Head,
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        let (a, b) = self.head.method;
        std::str::from_utf8(&self.buf[a..b]).unwrap_or_default()
    }
    fn path(&self) -> &str {
        let (a, b) = self.head.target;
        let target = std::str::from_utf8(&self.buf[a..b]).unwrap_or_default();
        target.split_once('?').map_or(target, |(p, _)| p)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .fields(self.buf)
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
    fn authority(&self) -> Option<&str> {
        None
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the upstream closes (the client's connection closes too).
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
struct ResponseHead {
    len: usize,
    status: u16,
    framing: Framing,
    /// The upstream connection can carry another request.
    reusable: bool,
    /// The client's connection closes after this response.
    closes: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum ResponseParse {
    Partial,
    /// A 1xx response of this many bytes, added to `out`.
    Interim(usize),
    Final(ResponseHead),
}

/// Parses a response head and adds it to `out` as the client gets it:
/// HTTP/1.1, without hop-by-hop fields, `connection: close` when the
/// client's connection will close (`close`, or a body delimited by the
/// upstream closing).
fn parse_response(
    buf: &[u8],
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseParse, String> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(ResponseParse::Partial),
        Ok(httparse::Status::Partial) => return Err("response head over 64 KiB".into()),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    let status = resp.code.unwrap_or_default();
    if status == 101 {
        return Err("switched protocols, which the request did not ask for".into());
    }
    let interim = (100..200).contains(&status);
    let mut length = None;
    let mut encoded = false;
    let mut chunked = false;
    let mut upstream_closes = resp.version != Some(1);
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            match digits(h.value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return Err("bad or conflicting content-length".into()),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding applied says how the body ends.
            encoded = true;
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection")
            && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"))
        {
            upstream_closes = true;
        }
    }
    let framing = if interim || head_request || status == 204 || status == 304 {
        Framing::Length(0)
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    let closes = close || framing == Framing::UntilClose;
    {
        use std::io::Write as _;
        let _ = write!(out, "HTTP/1.1 {status} ");
    }
    out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    // Gathered once: each field is checked against them.
    let connection: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value)
        .collect();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        // With a transfer coding, a content-length means nothing (RFC
        // 9112 section 6.3) and must not reach the client.
        if hop_by_hop(name, h.value, connection.iter().copied())
            || (encoded && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        field(out, name, h.value);
    }
    if closes && !interim {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if interim {
        return Ok(ResponseParse::Interim(len));
    }
    Ok(ResponseParse::Final(ResponseHead {
        len,
        status,
        framing,
        reusable: !upstream_closes && framing != Framing::UntilClose,
        closes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (Parsed, Head) {
        let mut head = Head::default();
        (head.parse(text.as_bytes()), head)
    }

    #[test]
    fn plain_requests_stay_and_the_rest_goes_to_hyper() {
        let (p, head) = parsed("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        assert!(matches!(p, Parsed::Complete));
        assert_eq!(head.content_length, 3);
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nHost: x\r\n").0,
            Parsed::Partial
        ));
        for unsupported in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                matches!(parsed(unsupported).0, Parsed::Unsupported),
                "{unsupported:?}"
            );
        }
    }

    #[test]
    fn the_request_sent_upstream_loses_hop_by_hop_fields_and_names_the_caller() {
        let text = "POST /x HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nx-skiff-client-id: forged\r\nX-Forwarded-For: 10.0.0.9\r\nContent-Length: 2\r\n\r\nhi";
        let (_, head) = parsed(text);
        let peer = Peer::new(
            Some("spiffe://td/ns/a/sa/b".parse().unwrap()),
            true,
            Some("198.18.0.7".parse().unwrap()),
        );
        let mut out = Vec::new();
        write_request(&mut out, text.as_bytes(), &head, &peer, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /x HTTP/1.1\r\nHost: api\r\nTE: trailers\r\nContent-Length: 2\r\nx-skiff-client-id: spiffe://td/ns/a/sa/b\r\nx-forwarded-for: 10.0.0.9, 198.18.0.7\r\n\r\nhi"
        );
    }

    fn response(
        text: &str,
        head_request: bool,
        close: bool,
    ) -> (Result<ResponseParse, String>, String) {
        let mut out = Vec::new();
        let r = parse_response(text.as_bytes(), head_request, close, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    fn framing(text: &str, head_request: bool) -> (Framing, bool) {
        match response(text, head_request, false).0 {
            Ok(ResponseParse::Final(h)) => (h.framing, h.reusable),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            (Framing::Chunked, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n", false),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\n\r\n", false),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            ),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            (Framing::Length(1), false)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
        ] {
            assert!(response(bad, false, false).0.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_client_gets_the_response_head_without_hop_by_hop_fields() {
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nX-Kept: 1\r\n\r\n",
            false,
            true,
        );
        assert!(matches!(r, Ok(ResponseParse::Final(_))));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\nconnection: close\r\n\r\n"
        );
        let (r, out) = response(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n",
            false,
            true,
        );
        assert_eq!(r, Ok(ResponseParse::Interim(40)));
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n");
    }

    async fn relayed(
        framing: Framing,
        body: &[u8],
        chunk: usize,
    ) -> (std::io::Result<bool>, Vec<u8>) {
        let (mut up_writer, mut up) = tokio::io::duplex(64);
        let body = body.to_vec();
        let writer = tokio::spawn(async move {
            for part in body.chunks(chunk) {
                if up_writer.write_all(part).await.is_err() {
                    return;
                }
            }
        });
        let mut down = Vec::new();
        let mut upstream = BytesMut::new();
        let mut out = b"HEAD\n".to_vec();
        let r = relay(framing, &mut up, &mut upstream, &mut down, &mut out).await;
        let _ = writer.await;
        (r, down)
    }

    #[tokio::test]
    async fn bodies_are_relayed_as_framed_and_no_further() {
        let chunked = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in [1, 3, 100] {
            let (r, down) = relayed(Framing::Chunked, chunked, piece).await;
            assert!(r.unwrap(), "clean at piece size {piece}");
            assert_eq!(down, [b"HEAD\n".as_slice(), chunked].concat());
            let (r, down) = relayed(Framing::Length(3), b"abc", piece).await;
            assert!(r.unwrap());
            assert_eq!(down, b"HEAD\nabc");
        }
        // Bytes after the body: the connection is not reused.
        let (r, down) = relayed(Framing::Length(3), b"abcdef", 100).await;
        assert!(!r.unwrap());
        assert_eq!(down, b"HEAD\nabc");
        let (r, down) = relayed(Framing::UntilClose, b"all of it", 2).await;
        assert!(!r.unwrap());
        assert_eq!(down, b"HEAD\nall of it");
        // Bodies larger than what is gathered before a write.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (r, down) = relayed(Framing::Length(big.len() as u64), &big, 7_000).await;
        assert!(r.unwrap());
        assert_eq!(down[5..], big[..]);
        let mut chunked = Vec::new();
        for part in big.chunks(70_000) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let (r, down) = relayed(Framing::Chunked, &chunked, 9_000).await;
        assert!(r.unwrap());
        assert_eq!(down[5..], chunked[..]);
        // Cut short, or lying about a chunk's size.
        assert!(relayed(Framing::Length(10), b"abc", 1).await.0.is_err());
        assert!(
            relayed(Framing::Chunked, b"2\r\nabc\r\n0\r\n\r\n", 100)
                .await
                .0
                .is_err()
        );
        assert!(relayed(Framing::Chunked, b"zz\r\n", 100).await.0.is_err());
    }
}
