#!/bin/sh
# Boots systemd in a container on an overlay of the host's root (see
# ../shared/REAL-SYSTEMD.md), for tests/container/mod.rs. Run it in a private mount
# namespace (`unshare -m --propagation private`): every mount below then vanishes
# with the container, and nothing the container writes reaches the host.
#
# usage: boot-container.sh SCRATCH MACHINE [CGROUP_DIR...]
#   SCRATCH      host directory; SCRATCH/stage is copied over the root before boot,
#                SCRATCH/root gets the tmpfs holding the overlay
#   MACHINE      container (and host) name
#   CGROUP_DIR   cgroups to move into first, so that systemd-nspawn (which, without a
#                systemd on the host, nests its cgroups under its own) leaves its
#                cgroups where the test can remove them
# environment:
#   NSPAWN_NETNS a network namespace file (e.g. /run/netns/NAME) for the container to
#                join instead of getting a private network of its own (tests/multihost.rs)
set -eu
scratch=$1
machine=$2
shift 2

root=$scratch/root
mkdir -p "$root"
mount -t tmpfs -o mode=0755 sticky-dispatch-test "$root"
mkdir "$root/upper" "$root/work" "$root/merged"
mount -t overlay overlay -o "lowerdir=/,upperdir=$root/upper,workdir=$root/work" "$root/merged"
# The binaries, units and config under test, at their installed paths.
cp -a "$scratch/stage/." "$root/merged/"

for cgroup in "$@"; do
    echo $$ > "$cgroup/cgroup.procs"
done

# basic.target: journald and the manager, without the host's services (databases,
# getty...) that multi-user.target would start in the copy of its root.
if [ -n "${NSPAWN_NETNS:-}" ]; then
    network="--network-namespace-path=$NSPAWN_NETNS"
else
    network=--private-network
fi
exec systemd-nspawn --quiet --directory="$root/merged" --boot --register=no --keep-unit \
    "$network" --machine="$machine" systemd.unit=basic.target
