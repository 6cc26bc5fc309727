# shellcheck shell=bash
# The IPVS VM, shared by scripts/vm-test and scripts/vm-bench (source it; it defines
# functions and variables, runs nothing by itself).
#
# The host kernel has no IPVS, so those scripts boot Debian's stock linux-image-amd64 with
# virtme-ng under software emulation (no KVM here), sharing this repository and its venv
# read-only. What differs between them is only the guest's work: each writes a guest
# script (starting with `vm_guest_prelude`) and hands it to `vm_boot`.
#
#   VM_NAME=vm-bench; source scripts/lib/vm.sh   (from the repository root)
#   vm_init                      checks the tooling, sets ROOT, KERNEL, VM_WORK, ...
#   vm_guest_prelude > "$VM_WORK/guest.sh"; echo "my commands" >> "$VM_WORK/guest.sh"
#   vm_boot "$VM_WORK/guest.sh"  boots, runs it, returns when the VM is gone
#   vm_finish                    removes VM_WORK
#
# Environment knobs: LBD_VM_TIMEOUT (seconds for the whole VM run, default
# VM_DEFAULT_TIMEOUT or 2400), LBD_VM_MEMORY (default VM_DEFAULT_MEMORY or 2G),
# LBD_VM_KERNEL (a vmlinuz path). VM_RW_DIRS: host directories the guest may write, at the
# same path (mounted after the read-only repository, so they may lie inside it).
# VM_CACHE_USR=1: /usr (every binary and library: Debian's /bin and /lib point into it) is
# mounted again with a guest-side cache, so that starting a program (iptables-restore,
# ip netns exec) does not read it over uncached 9p each time.

VM_NAME=${VM_NAME:-vm}

vm_fail() { echo "$VM_NAME: $*" >&2; exit 2; }

vm_init() {
  ROOT=$PWD
  VM_TIMEOUT=${LBD_VM_TIMEOUT:-${VM_DEFAULT_TIMEOUT:-2400}}
  VM_MEMORY=${LBD_VM_MEMORY:-${VM_DEFAULT_MEMORY:-2G}}
  KERNEL=${LBD_VM_KERNEL:-$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1 || true)}
  [ -x venv/bin/python ] || vm_fail "no venv: run scripts/setup --vm"
  [ -x venv/bin/vng ] || vm_fail "virtme-ng is not installed in the venv: run scripts/setup --vm"
  command -v qemu-system-x86_64 >/dev/null || vm_fail "qemu-system-x86_64 is missing: run scripts/setup --vm"
  [ -n "$KERNEL" ] && [ -r "$KERNEL" ] || vm_fail "no /boot/vmlinuz-*-amd64 kernel: run scripts/setup --vm"
  local release
  release=$(basename "$KERNEL"); release=${release#vmlinuz-}
  [ -d "/lib/modules/$release" ] || vm_fail "no modules for $release in /lib/modules"
  PYHOME=$(venv/bin/python -c 'import sys; print(sys.base_prefix)')
  # The guest sees the tree read-only: compile here so it never recompiles in emulation.
  venv/bin/python -m compileall -q lbd backends bpf_lb benchmarks tests >/dev/null || true
  VM_WORK=$(mktemp -d "/tmp/lbd-$VM_NAME.XXXXXX")
  chmod 755 "$VM_WORK"
  VM_RW_DIRS=()
}

# The start of every guest script: remounts and kernel modules.
vm_guest_prelude() {
  cat <<EOF
#!/bin/sh
# Inside the VM. The root filesystem is 9p without caching (every stat is a round trip
# to the host): mount the repository (with its venv) and the Python installation again
# with a guest-side cache, which makes imports several times faster.
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro lbdrepo "$ROOT"
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro lbdpython "$PYHOME"
EOF
  if [ "${VM_CACHE_USR:-0}" = 1 ]; then
    echo "mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro lbdusr /usr"
  fi
  local i=0 dir
  for dir in "${VM_RW_DIRS[@]}"; do
    # Writable, uncached (the host reads it while the guest writes), over the repository.
    echo "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 lbdrw$i $(printf %q "$dir")"
    i=$((i + 1))
  done
  cat <<EOF
# IPVS and what the tests and benchmarks use; most would autoload, loading them here is
# quicker and makes a missing one obvious.
for m in ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh nf_conntrack dummy veth bridge \\
         ip_set ip_set_hash_ip ip_set_hash_ipport ip_set_hash_ipportip ip_set_hash_ipportnet \\
         ip_set_bitmap_port xt_set xt_mark xt_comment xt_conntrack xt_addrtype xt_MASQUERADE \\
         ipt_REJECT ip6t_REJECT nft_compat nf_tables iptable_nat iptable_filter iptable_mangle \\
         ip6table_nat ip6table_filter ip6table_mangle nf_conntrack_netlink sctp; do
  modprobe -q "\$m" || echo "$VM_NAME: modprobe \$m failed" >&2
done
cd "$ROOT"
EOF
}

# Boot the VM running `sh GUEST_SCRIPT`; returns when the VM has ended (or was ended by
# the timeout or a signal). Nothing of the VM outlives this function.
vm_boot() {
  local guest=$1 opts dir i=0
  opts="-virtfs local,path=$ROOT,mount_tag=lbdrepo,security_model=none,readonly=on"
  opts+=" -virtfs local,path=$PYHOME,mount_tag=lbdpython,security_model=none,readonly=on"
  if [ "${VM_CACHE_USR:-0}" = 1 ]; then
    opts+=" -virtfs local,path=/usr,mount_tag=lbdusr,security_model=none,readonly=on"
  fi
  for dir in "${VM_RW_DIRS[@]}"; do
    [[ "$dir" != *[,\ ]* ]] || vm_fail "a shared directory may not contain commas or spaces: $dir"
    opts+=" -virtfs local,path=$dir,mount_tag=lbdrw$i,security_model=none"
    i=$((i + 1))
  done
  echo "$VM_NAME: booting $KERNEL (software emulation; the boot takes a minute or two)"
  VM_STARTED=$(date +%s)
  # In a process group of its own (job control on for this one job), so that a timeout or
  # ^C ends QEMU and its helpers with it. Through a pipe: QEMU reopens its stdout, which
  # would overwrite the calling script's own lines when stdout is a file.
  set -m
  (
    PATH="$ROOT/venv/bin:$PATH" venv/bin/vng --run "$KERNEL" --disable-kvm \
      --memory "$VM_MEMORY" --rwdir "$VM_WORK" --exec "sh $guest" --qemu-opts="$opts" \
      </dev/null 2>&1 | cat
  ) &
  VM_PID=$!
  set +m
  _vm_watchdog &
  VM_WATCHDOG=$!
  trap 'kill $VM_WATCHDOG 2>/dev/null; _vm_stop; rm -rf "$VM_WORK"; exit 130' INT TERM
  wait "$VM_PID" || true
  kill "$VM_WATCHDOG" 2>/dev/null || true
  wait "$VM_WATCHDOG" 2>/dev/null || true
  _vm_stop
  trap - INT TERM
}

vm_elapsed() { echo $(( $(date +%s) - VM_STARTED )); }

vm_finish() { rm -rf "$VM_WORK"; }

_vm_stop() {
  kill -TERM -- "-$VM_PID" 2>/dev/null || true
  sleep 2
  kill -KILL -- "-$VM_PID" 2>/dev/null || true
}

_vm_watchdog() {
  sleep "$VM_TIMEOUT" &
  local s=$!
  trap 'kill $s 2>/dev/null; exit 0' TERM
  wait $s
  echo "$VM_NAME: timed out after ${VM_TIMEOUT}s" >&2
  kill -TERM -- "-$VM_PID" 2>/dev/null
}
