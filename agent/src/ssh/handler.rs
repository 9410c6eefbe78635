//! One SSH connection: public-key authentication against the grant's keys,
//! and the session channels (pty, env, shell, exec, sftp, window changes).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Pty};

use crate::ssh::channel_io::{self, Input, Running, SubsystemStream};
use crate::ssh::keys::is_authorized;
use crate::ssh::process::{self, Login, Request};
use crate::ssh::pty::{self, WindowSize};
use crate::ssh::sftp::Sftp;
use crate::system::console;
use crate::user;

/// Exit status for a session whose program could not start, as in a shell.
const NOT_RUNNABLE: u32 = kiln_protocol::EXIT_NOT_FOUND as u32;

#[derive(Default)]
struct ChannelState {
    /// Kept until a subsystem takes it over as a stream.
    channel: Option<Channel<Msg>>,
    pty: Option<(String, WindowSize)>,
    env: Vec<(String, String)>,
    running: Option<Running>,
}

pub struct Client {
    allowed: Arc<Vec<PublicKey>>,
    rt: tokio::runtime::Handle,
    login: Option<Login>,
    channels: HashMap<ChannelId, ChannelState>,
}

impl Client {
    pub fn new(allowed: Arc<Vec<PublicKey>>, rt: tokio::runtime::Handle) -> Self {
        Client {
            allowed,
            rt,
            login: None,
            channels: HashMap::new(),
        }
    }

    fn start(
        &mut self,
        channel: ChannelId,
        command: Option<&str>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let (Some(login), Some(state)) = (self.login.as_ref(), self.channels.get_mut(&channel))
        else {
            return session.channel_failure(channel);
        };
        if state.running.is_some() {
            return session.channel_failure(channel);
        }
        // Input reaches the program through `data()`; an unread channel
        // queue would fill up and stall the whole connection.
        state.channel = None;
        let req = Request {
            command,
            pty: state.pty.as_ref().map(|(t, s)| (t.as_str(), *s)),
            client_env: &state.env,
        };
        match process::spawn(login, &req) {
            Ok(p) => {
                session.channel_success(channel)?;
                state.running = Some(channel_io::run(
                    p,
                    channel,
                    session.handle(),
                    self.rt.clone(),
                ));
            }
            Err(e) => {
                // Accept the request so the client shows the reason, then end.
                console(&format!("ssh: {e}"));
                session.channel_success(channel)?;
                session.extended_data(channel, 1, format!("kiln: {e}\r\n").into_bytes())?;
                session.exit_status_request(channel, NOT_RUNNABLE)?;
                session.eof(channel)?;
                session.close(channel)?;
            }
        }
        Ok(())
    }
}

/// Client variables accepted, as OpenSSH's default `AcceptEnv LANG LC_*`.
fn accepted_env(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_")
}

impl russh::server::Handler for Client {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Refuse unknown keys before the client bothers to sign.
        Ok(if is_authorized(&self.allowed, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !is_authorized(&self.allowed, key.public_key) {
            return Ok(Auth::reject());
        }
        match user::resolve(Some(user), Path::new("/")) {
            Ok(id) => {
                self.login = Some(Login::new(id, Path::new("/")));
                Ok(Auth::Accept)
            }
            Err(e) => {
                console(&format!("ssh: login refused: {e}"));
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.login.is_none() {
            return Ok(()); // dropping `reply` rejects the channel
        }
        let state = ChannelState {
            channel: Some(channel),
            ..Default::default()
        };
        if let Some(id) = state.channel.as_ref().map(|c| c.id()) {
            self.channels.insert(id, state);
        }
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        px_width: u32,
        px_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(state) if state.running.is_none() => {
                let size = WindowSize {
                    cols,
                    rows,
                    px_width,
                    px_height,
                };
                state.pty = Some((term.to_string(), size));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(state) if accepted_env(name) => {
                state.env.push((name.to_string(), value.to_string()));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, None, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(channel, Some(&command), session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let taken = match (name, self.login.as_ref()) {
            ("sftp", Some(login)) => self
                .channels
                .get_mut(&channel)
                .and_then(|s| s.channel.take())
                .map(|c| (c, Sftp::new(&login.identity))),
            _ => None,
        };
        match taken {
            Some((c, sftp)) => {
                session.channel_success(channel)?;
                // Runs on its own task until the client closes the channel.
                let stream = SubsystemStream::new(c.into_stream(), channel, session.handle());
                russh_sftp::server::run(stream, sftp).await;
                Ok(())
            }
            None => session.channel_failure(channel),
        }
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        px_width: u32,
        px_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = WindowSize {
            cols,
            rows,
            px_width,
            px_height,
        };
        if let Some(state) = self.channels.get_mut(&channel) {
            if let Some((_, s)) = state.pty.as_mut() {
                *s = size;
            }
            if let Some(leader) = state.running.as_ref().and_then(|r| r.pty.as_ref()) {
                if let Err(e) = pty::resize(leader, size) {
                    console(&format!("ssh: window change: {e}"));
                }
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(r) = self.channels.get(&channel).and_then(|s| s.running.as_ref()) {
            let _ = r.input.send(Input::Data(data.to_vec()));
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(r) = self.channels.get(&channel).and_then(|s| s.running.as_ref()) {
            let _ = r.input.send(Input::Eof);
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(r) = self.channels.remove(&channel).and_then(|s| s.running) {
            // Like a terminal hang-up; harmless if the program already exited.
            // SAFETY: kill(2) on the session's process group.
            unsafe { libc::kill(-r.pid, libc::SIGHUP) };
        }
        Ok(())
    }
}

impl Drop for Client {
    /// A dropped connection hangs up every program it still runs.
    fn drop(&mut self) {
        for r in self.channels.values().filter_map(|s| s.running.as_ref()) {
            // SAFETY: kill(2) on the session's process group.
            unsafe { libc::kill(-r.pid, libc::SIGHUP) };
        }
    }
}
