//! The parent's own container, when it runs in one: runners are made from
//! it (its image, networks, environment, command). Not its user (runners
//! run as the image's: a parent given root to reach the Docker socket does
//! not make its runners root) nor its mounts (the socket among them).
//!
//! How the container is found, first match wins:
//! 1. `/proc/self/mountinfo`: Docker bind-mounts `/etc/hostname`,
//!    `/etc/hosts` and `/etc/resolv.conf` from
//!    `<data-root>/containers/<id>/`, so the 64-hex id is in their source
//!    paths (cgroup v1 and v2 alike, whatever the hostname);
//! 2. `/proc/self/cgroup`: `/docker/<id>` or `docker-<id>.scope` (cgroup v1,
//!    or v2 without a cgroup namespace);
//! 3. the hostname, which Docker sets to the id's first 12 characters
//!    unless the container was given one (or shares the host's network).
//!
//! The id found is then inspected through the Engine API; a container the
//! Engine does not know is no match.

use std::collections::HashMap;

use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::InspectContainerOptions;

use crate::api::Api;
use crate::error::DockerError;

/// Label Compose puts on the containers of a project.
const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";

/// What runners take from the parent's container.
#[derive(Clone, Default)]
pub(crate) struct OwnContainer {
    /// Its id.
    pub(crate) id: String,
    /// The image it runs, by id (`sha256:...`): runners run the very same
    /// build even if the tag moved since.
    pub(crate) image: String,
    /// Its environment as configured (`KEY=value`); secrets included, so
    /// never logged.
    pub(crate) env: Vec<String>,
    pub(crate) entrypoint: Option<Vec<String>>,
    pub(crate) cmd: Option<Vec<String>>,
    pub(crate) working_dir: Option<String>,
    /// `HostConfig.Init`: an init process (`docker run --init`, Compose's
    /// `init: true`) runs the command.
    pub(crate) init: Option<bool>,
    /// `HostConfig.NetworkMode`: `host`, `bridge`, a network's name...
    pub(crate) network_mode: Option<String>,
    /// The networks it is attached to, by name.
    pub(crate) networks: Vec<String>,
    /// Its Compose project, if Compose made it.
    pub(crate) compose_project: Option<String>,
}

impl std::fmt::Debug for OwnContainer {
    /// The environment's names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<&str> = self
            .env
            .iter()
            .map(|kv| kv.split('=').next().unwrap_or_default())
            .collect();
        f.debug_struct("OwnContainer")
            .field("id", &self.id)
            .field("image", &self.image)
            .field("env", &env)
            .field("network_mode", &self.network_mode)
            .field("networks", &self.networks)
            .finish_non_exhaustive()
    }
}

/// Finds and inspects this process's container.
pub(crate) async fn find(api: &Api) -> Result<OwnContainer, DockerError> {
    let candidates = candidate_ids();
    if candidates.is_empty() {
        return Err(DockerError::OwnContainer(
            "no container id in /proc/self/mountinfo, /proc/self/cgroup or the hostname".into(),
        ));
    }
    let mut tried = Vec::new();
    for id in candidates {
        let inspected = api
            .send("inspect this process's container", None, |docker| {
                let id = id.clone();
                async move {
                    docker
                        .inspect_container(&id, None::<InspectContainerOptions>)
                        .await
                }
            })
            .await;
        match inspected {
            Ok(found) => return from_inspect(found),
            Err(e) if e.status() == Some(404) => tried.push(id),
            Err(e) => return Err(e),
        }
    }
    Err(DockerError::OwnContainer(format!(
        "the Engine knows no container {}",
        tried.join(" or ")
    )))
}

fn from_inspect(found: ContainerInspectResponse) -> Result<OwnContainer, DockerError> {
    let config = found.config.unwrap_or_default();
    let image = found
        .image
        .or(config.image)
        .ok_or_else(|| DockerError::Unexpected("this process's container has no image".into()))?;
    let labels: HashMap<String, String> = config.labels.unwrap_or_default();
    let mut networks: Vec<String> = found
        .network_settings
        .and_then(|n| n.networks)
        .map(|n| n.into_keys().collect())
        .unwrap_or_default();
    networks.sort();
    Ok(OwnContainer {
        id: found.id.unwrap_or_default(),
        image,
        env: config.env.unwrap_or_default(),
        entrypoint: config.entrypoint,
        cmd: config.cmd,
        working_dir: config.working_dir.filter(|w| !w.is_empty()),
        init: found.host_config.as_ref().and_then(|h| h.init),
        network_mode: found.host_config.and_then(|h| h.network_mode),
        networks,
        compose_project: labels.get(COMPOSE_PROJECT_LABEL).cloned(),
    })
}

/// Ids this process's container may have, best first.
fn candidate_ids() -> Vec<String> {
    let mut ids = Vec::new();
    let mut add = |id: Option<String>| {
        if let Some(id) = id {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    };
    add(std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|s| id_in_mountinfo(&s)));
    add(std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| id_in_cgroup(&s)));
    add(std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(|s| id_in_hostname(&s)));
    ids
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The id in a source path `.../containers/<id>/...` of a mount.
fn id_in_mountinfo(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        line.split(' ').find_map(|field| {
            let (_, rest) = field.split_once("/containers/")?;
            let id = rest.split('/').next()?;
            is_id(id).then(|| id.to_string())
        })
    })
}

/// The id in a cgroup path: `/docker/<id>` or `docker-<id>.scope`.
fn id_in_cgroup(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').find_map(|part| {
            let part = part
                .strip_prefix("docker-")
                .and_then(|p| p.strip_suffix(".scope"))
                .unwrap_or(part);
            is_id(part).then(|| part.to_string())
        })
    })
}

/// The hostname when it looks like a short container id.
fn id_in_hostname(hostname: &str) -> Option<String> {
    let name = hostname.trim();
    (name.len() == 12 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c9b2a7d4e5f60718293a4b5c6d7e8f90112233445566778899000aabbccdd";

    #[test]
    fn the_id_is_found_where_docker_leaves_it() {
        let mountinfo = format!(
            "1 0 0:1 / / rw - overlay overlay rw\n\
             812 790 254:1 /var/lib/docker/containers/{ID}/hostname /etc/hostname rw - ext4 /dev/vda rw\n"
        );
        assert_eq!(id_in_mountinfo(&mountinfo).as_deref(), Some(ID));
        assert_eq!(
            id_in_mountinfo("1 0 0:1 / / rw - overlay overlay rw\n"),
            None
        );
        let v1 = format!("4:memory:/docker/{ID}\n1:cpu:/docker/{ID}\n");
        assert_eq!(id_in_cgroup(&v1).as_deref(), Some(ID));
        let systemd = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(id_in_cgroup(&systemd).as_deref(), Some(ID));
        assert_eq!(id_in_cgroup("0::/\n"), None);
        assert_eq!(
            id_in_hostname("3f1c9b2a7d4e\n").as_deref(),
            Some("3f1c9b2a7d4e")
        );
        assert_eq!(id_in_hostname("web-1\n"), None);
    }
}
