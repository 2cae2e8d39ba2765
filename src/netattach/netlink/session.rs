//! One rtnetlink connection inside a namespace, with every request bounded in time: the
//! link, route and rule reads and the writes that configure an interface after a move.

use super::messages::{
    all_tables, is_already_exists, is_errno, link_name, route_message, rule_message,
};
use crate::netattach::{InterfaceRule, InterfaceSnapshot, NetAttachError};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::rule::RuleMessage;
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// A netlink connection inside one namespace, with every request bounded in time.
pub(super) struct Session<'a> {
    pub(super) runtime: &'a tokio::runtime::Runtime,
    pub(super) handle: Handle,
    pub(super) ns: &'a str,
    pub(super) timeout: Duration,
}

impl Session<'_> {
    pub(super) fn run<T>(
        &self,
        what: &'static str,
        ifname: &str,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetAttachError> {
        match self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, request).await })
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(NetAttachError::Netlink {
                what,
                ifname: ifname.to_string(),
                ns: self.ns.to_string(),
                source: Box::new(source),
            }),
            Err(_) => Err(NetAttachError::Timeout {
                what,
                ifname: ifname.to_string(),
                ns: self.ns.to_string(),
                after: self.timeout,
            }),
        }
    }

    /// Like [`Session::run`] but "already exists" counts as done, which makes re-applying a
    /// snapshot (retry, crash recovery) idempotent.
    fn run_allow_exists(
        &self,
        what: &'static str,
        ifname: &str,
        request: impl Future<Output = Result<(), rtnetlink::Error>>,
    ) -> Result<(), NetAttachError> {
        match self.run(what, ifname, request) {
            Err(NetAttachError::Netlink { source, .. }) if is_already_exists(&source) => Ok(()),
            other => other,
        }
    }

    pub(super) fn links(&self, ifname: &str) -> Result<Vec<LinkMessage>, NetAttachError> {
        self.run(
            "listing links",
            ifname,
            self.handle.link().get().execute().try_collect::<Vec<_>>(),
        )
    }

    pub(super) fn link_named(&self, name: &str) -> Result<Option<LinkMessage>, NetAttachError> {
        Ok(self
            .links(name)?
            .into_iter()
            .find(|link| link_name(link) == Some(name)))
    }

    pub(super) fn require_link(&self, name: &str) -> Result<LinkMessage, NetAttachError> {
        self.link_named(name)?
            .ok_or_else(|| NetAttachError::NotFound {
                ifname: name.to_string(),
                ns: self.ns.to_string(),
            })
    }

    pub(super) fn routes(&self, ifname: &str) -> Result<Vec<RouteMessage>, NetAttachError> {
        let mut routes = self.run(
            "listing IPv4 routes",
            ifname,
            self.handle
                .route()
                .get(all_tables(RouteMessageBuilder::<Ipv4Addr>::new().build()))
                .execute()
                .try_collect::<Vec<_>>(),
        )?;
        routes.extend(
            self.run(
                "listing IPv6 routes",
                ifname,
                self.handle
                    .route()
                    .get(all_tables(RouteMessageBuilder::<Ipv6Addr>::new().build()))
                    .execute()
                    .try_collect::<Vec<_>>(),
            )?,
        );
        Ok(routes)
    }

    pub(super) fn rules(&self, ifname: &str) -> Result<Vec<RuleMessage>, NetAttachError> {
        let mut rules = self.run(
            "listing IPv4 rules",
            ifname,
            self.handle
                .rule()
                .get(IpVersion::V4)
                .execute()
                .try_collect::<Vec<_>>(),
        )?;
        rules.extend(
            self.run(
                "listing IPv6 rules",
                ifname,
                self.handle
                    .rule()
                    .get(IpVersion::V6)
                    .execute()
                    .try_collect::<Vec<_>>(),
            )?,
        );
        Ok(rules)
    }

    /// Adds each rule unless an identical one exists: the kernel answers EEXIST for an
    /// exclusive add of a rule equal in every selector, priority and protocol.
    fn add_rules(&self, ifname: &str, rules: &[InterfaceRule]) -> Result<(), NetAttachError> {
        for rule in rules {
            let mut request = self.handle.rule().add();
            *request.message_mut() = rule_message(rule);
            self.run_allow_exists("adding rule", ifname, request.execute())?;
        }
        Ok(())
    }

    /// Deletes each rule that is there; a missing one is already done.
    pub(super) fn delete_rules(
        &self,
        ifname: &str,
        rules: &[InterfaceRule],
    ) -> Result<(), NetAttachError> {
        for rule in rules {
            match self.run(
                "deleting rule",
                ifname,
                self.handle.rule().del(rule_message(rule)).execute(),
            ) {
                Err(NetAttachError::Netlink { source, .. })
                    if is_errno(&source, nix::errno::Errno::ENOENT) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Sets MTU, adds addresses, brings the link up (when asked) and adds the routes, then
    /// `rules`: the order matters, a gateway route needs its on-link address and an up link.
    pub(super) fn configure(
        &self,
        index: u32,
        name: &str,
        snapshot: &InterfaceSnapshot,
        rules: &[InterfaceRule],
        up: bool,
    ) -> Result<(), NetAttachError> {
        self.run(
            "setting MTU",
            name,
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(snapshot.mtu).build())
                .execute(),
        )?;
        for a in &snapshot.addresses {
            self.run_allow_exists(
                "adding address",
                name,
                self.handle
                    .address()
                    .add(index, a.address, a.prefix_len)
                    .execute(),
            )?;
        }
        if up {
            self.run(
                "setting link up",
                name,
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute(),
            )?;
        }
        for r in &snapshot.routes {
            let message = route_message(index, name, r)?;
            self.run_allow_exists(
                "adding route",
                name,
                self.handle.route().add(message).execute(),
            )?;
        }
        self.add_rules(name, rules)
    }
}
