#!/usr/bin/env bash
# Capture a real Linux guest's arm-smmu-v3 command stream under QEMU and import it into a vcmdq
# trace. `make linux-trace` runs this; traces/linux/README.md says what it does, its parameters
# and what it costs. Parameters are NAME=VALUE arguments or environment variables, e.g.
#   traces/linux/capture.sh WORKLOAD=lazy VCPUS=4
# Everything it downloads or builds goes under CACHE and OUT (target/linux-trace/ by default).
# The only network it reaches is Debian's package registry, through apt; the guest gets no
# network beyond QEMU-internal hubs between its own NICs.
set -euo pipefail

for arg in "$@"; do
	case "$arg" in
	[A-Z_]*=*) export "${arg?}" ;;
	-h | --help)
		sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
		echo "See traces/linux/README.md for the parameters."
		exit 0
		;;
	*)
		echo "capture.sh: unknown argument '$arg' (parameters are NAME=VALUE, see traces/linux/README.md)" >&2
		exit 2
		;;
	esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$REPO/traces/linux"

# --- parameters --------------------------------------------------------------------------------
WORKLOAD=${WORKLOAD:-strict}
case "$WORKLOAD" in
strict) : "${STRICT:=1}" ;;
lazy) : "${STRICT:=0}" ;;
quick) # a short boot-and-check: one small pass of everything
	: "${STRICT:=1}" "${BLOCK_SIZES:=4096 65536}" "${DD_KB:=1024}" "${NET_KB:=512}" "${DOMAIN_KB:=256}" ;;
block) : "${STRICT:=1}" "${NIC_PAIRS:=0}" "${DOMAIN_CYCLES:=0}" ;;
net) : "${STRICT:=1}" "${DD_KB:=256}" "${BLOCK_SIZES:=65536}" "${DOMAIN_CYCLES:=0}" ;;
domains) : "${STRICT:=1}" "${NIC_PAIRS:=0}" "${DD_KB:=256}" "${BLOCK_SIZES:=65536}" "${DOMAIN_CYCLES:=3}" ;;
*)
	echo "capture.sh: unknown WORKLOAD '$WORKLOAD' (strict, lazy, quick, block, net, domains)" >&2
	exit 2
	;;
esac
STRICT=${STRICT:-1}
KERNEL=${KERNEL:-linux-image-cloud-arm64}
VCPUS=${VCPUS:-2}
MEM=${MEM:-1024}
QEMU_CPU=${QEMU_CPU:-cortex-a57}
DISKS=${DISKS:-1}
DISK_MB=${DISK_MB:-64}
BLOCK_SIZES=${BLOCK_SIZES:-4096 65536 1048576}
DD_KB=${DD_KB:-8192}
NIC_PAIRS=${NIC_PAIRS:-1}
NET_KB=${NET_KB:-4096}
DOMAIN_CYCLES=${DOMAIN_CYCLES:-1}
DOMAIN_KB=${DOMAIN_KB:-1024}
ATS=${ATS:-0}
TIMEOUT=${TIMEOUT:-900}
TRACE=${TRACE:-smmuv3_*}
CACHE=${CACHE:-$REPO/target/linux-trace/cache}
OUT=${OUT:-$REPO/target/linux-trace/$WORKLOAD}
VCMDQ=${VCMDQ:-$REPO/target/release/vcmdq}
IMPORT=${IMPORT:-1}

STAGES=8
stage=0
t0=$(date +%s)
step() {
	stage=$((stage + 1))
	echo "linux-trace [$stage/$STAGES] (+$(($(date +%s) - t0))s) $*"
}
die() {
	if [ "$stage" -gt 0 ]; then
		echo "linux-trace: FAILED at stage $stage/$STAGES: $*" >&2
	else
		echo "linux-trace: FAILED: $*" >&2
	fi
	exit 1
}
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

for v in STRICT VCPUS MEM DISKS DISK_MB DD_KB NIC_PAIRS NET_KB DOMAIN_CYCLES DOMAIN_KB ATS TIMEOUT; do
	is_uint "${!v}" || die "$v must be a whole number, not '${!v}'"
done
for bs in $BLOCK_SIZES; do
	is_uint "$bs" && [ "$bs" -ge 512 ] && [ $((bs % 512)) -eq 0 ] ||
		die "BLOCK_SIZES holds '$bs': each must be a multiple of 512 bytes (O_DIRECT), e.g. 4096 65536"
done
[ "$STRICT" -le 1 ] || die "STRICT is 1 (iommu.strict=1) or 0 (lazy), not $STRICT"
[ "$VCPUS" -ge 1 ] && [ "$VCPUS" -le 8 ] || die "VCPUS must be 1 to 8, not $VCPUS"
[ "$NIC_PAIRS" -le 9 ] || die "NIC_PAIRS must be at most 9 (one MAC digit), not $NIC_PAIRS"
[ "$DISKS" -le 8 ] || die "DISKS must be at most 8, not $DISKS"
[ $(((DD_KB > NET_KB ? DD_KB : NET_KB) / 1024)) -lt "$DISK_MB" ] ||
	die "DD_KB/NET_KB read past the end of a ${DISK_MB} MiB disk: raise DISK_MB"
if [ "$ATS" != 0 ]; then
	die "ATS=1 asked for, but QEMU 7.2's SMMUv3 does not implement ATS (SMMU_IDR0.ATS is 0, so Linux \
never enables it on a device and issues no ATC_INV); run without ATS"
fi

# --- 1. host packages ---------------------------------------------------------------------------
step "host packages: qemu-system-aarch64, cpio, xz, zstd, the arm64 architecture for apt"
apt_updated=0
need_root() {
	[ "$(id -u)" -eq 0 ] || die "$1 is missing and installing it needs root (apt-get); run as root or install it"
}
apt_update() {
	if [ "$apt_updated" = 0 ]; then
		echo "  apt-get update"
		timeout 600 apt-get update -qq || die "apt-get update failed (is Debian's package registry reachable?)"
		apt_updated=1
	fi
}
missing=()
command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
command -v cpio >/dev/null || missing+=(cpio)
command -v gzip >/dev/null || missing+=(gzip)
# Newer kernel packages ship their modules compressed.
command -v xz >/dev/null || missing+=(xz-utils)
command -v zstd >/dev/null || missing+=(zstd)
if [ "${#missing[@]}" -gt 0 ]; then
	need_root "${missing[*]}"
	apt_update
	echo "  apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 is still missing after installing qemu-system-arm"
QEMU_VERSION=$(qemu-system-aarch64 --version | head -n 1)
echo "  $QEMU_VERSION"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
	need_root "apt's arm64 architecture"
	echo "  dpkg --add-architecture arm64"
	dpkg --add-architecture arm64
	apt_updated=0
	apt_update
fi
# Which smmuv3 events this QEMU can log; the command-queue ones are what the import reads.
qemu-system-aarch64 -trace help 2>/dev/null | grep -q '^smmuv3_cmdq_consume$' ||
	die "this QEMU has no smmuv3_cmdq_consume trace event (needs a QEMU built with the log trace backend)"

# --- 2. guest packages: the arm64 kernel and busybox-static, downloaded, never installed --------
step "guest packages: $KERNEL and busybox-static for arm64 (apt-get download, dpkg-deb -x)"
mkdir -p "$CACHE/debs"
# apt's _apt user downloads into this directory.
chmod 0777 "$CACHE/debs" 2>/dev/null || true
apt_pkg_known() { apt-cache show "$1:arm64" >/dev/null 2>&1; }
if ! apt_pkg_known "$KERNEL" || ! apt_pkg_known busybox-static; then
	[ "$(id -u)" -eq 0 ] && apt_update
fi
apt_pkg_known busybox-static || die "apt has no busybox-static for arm64 (after apt-get update)"
apt_pkg_known "$KERNEL" || die "apt has no package '$KERNEL' for arm64. Cloud kernels apt has: $(
	apt-cache search --names-only '^linux-image-.*cloud-arm64$' | cut -d' ' -f1 | sort -V | tr '\n' ' ')"
# A meta-package (linux-image-cloud-arm64) depends on the versioned image package: follow it.
pkg=$KERNEL
for _ in 1 2 3; do
	dep=$(apt-cache depends "$pkg:arm64" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ :]*\).*/\1/p' | head -n 1)
	[ -n "$dep" ] || break
	pkg=$dep
done
KERNEL_PKG=$pkg
KERNEL_VERSION=$(apt-cache policy "$KERNEL_PKG:arm64" | sed -n 's/^ *Candidate: //p')
BUSYBOX_VERSION=$(apt-cache policy busybox-static:arm64 | sed -n 's/^ *Candidate: //p')
echo "  kernel package $KERNEL_PKG $KERNEL_VERSION, busybox-static $BUSYBOX_VERSION"
fetch_deb() { # $1 package; prints the .deb's path
	local name=$1 deb
	deb=$(ls "$CACHE/debs/${name}_"*_arm64.deb 2>/dev/null | head -n 1 || true)
	if [ -z "$deb" ]; then
		(cd "$CACHE/debs" && timeout 600 apt-get download -q "$name:arm64" >/dev/null 2>&1) ||
			die "apt-get download $name:arm64 failed"
		deb=$(ls "$CACHE/debs/${name}_"*_arm64.deb | head -n 1)
	fi
	echo "$deb"
}
KDEB=$(fetch_deb "$KERNEL_PKG")
BDEB=$(fetch_deb busybox-static)
KROOT="$CACHE/root/$(basename "$KDEB" .deb)"
BROOT="$CACHE/root/$(basename "$BDEB" .deb)"
[ -d "$KROOT/boot" ] || { mkdir -p "$KROOT" && dpkg-deb -x "$KDEB" "$KROOT"; } || die "dpkg-deb -x $KDEB failed"
[ -x "$BROOT/bin/busybox" ] || { mkdir -p "$BROOT" && dpkg-deb -x "$BDEB" "$BROOT"; } || die "dpkg-deb -x $BDEB failed"
VMLINUZ=$(ls "$KROOT"/boot/vmlinuz-* 2>/dev/null | head -n 1)
[ -n "$VMLINUZ" ] || die "$KDEB has no /boot/vmlinuz-*: is '$KERNEL' a kernel image package?"
KVER=${VMLINUZ##*/vmlinuz-}
KCONFIG="$KROOT/boot/config-$KVER"
grep -q '^CONFIG_ARM_SMMU_V3=y' "$KCONFIG" || die "kernel $KVER is not built with CONFIG_ARM_SMMU_V3=y"
echo "  kernel $KVER"

# --- 3. initramfs -------------------------------------------------------------------------------
step "initramfs: busybox, init, workload.sh, the virtio modules"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stage_dir="$OUT/initramfs"
rm -rf "$stage_dir"
mkdir -p "$stage_dir"/{bin,etc,lib/modules,proc,sys,dev,tmp}
cp "$BROOT/bin/busybox" "$stage_dir/bin/busybox"
# /init is a shell script: its interpreter must exist before busybox --install makes the rest.
ln -s busybox "$stage_dir/bin/sh"
install -m 0755 "$HERE/init" "$stage_dir/init"
install -m 0755 "$HERE/workload.sh" "$stage_dir/workload.sh"
MODDIR="$KROOT/lib/modules/$KVER/kernel"
# A module's file (.ko, or compressed .ko.xz/.ko.zst), by name ('-' and '_' are the same).
module_file() {
	local n=${1//-/_}
	find "$MODDIR" \( -name "$n.ko" -o -name "$n.ko.xz" -o -name "$n.ko.zst" -o -name "$n.ko.gz" \
		-o -name "${n//_/-}.ko" -o -name "${n//_/-}.ko.xz" -o -name "${n//_/-}.ko.zst" \) 2>/dev/null | head -n 1
}
declare -A placed=()
order=()
# Copies module $1 (decompressed: busybox's insmod takes plain .ko) after its dependencies, which
# are read from the module's own .modinfo section (the package ships no modules.dep).
place_module() {
	local n=${1//-/_} f ko deps d
	[ -z "${placed[$n]:-}" ] || return 0
	placed[$n]=1
	f=$(module_file "$n")
	[ -n "$f" ] || die "module $n is neither built in nor in $KDEB"
	ko="$stage_dir/lib/modules/$n.ko"
	case "$f" in
	*.xz) xz -dc "$f" >"$ko" ;;
	*.zst) zstd -qdc "$f" >"$ko" ;;
	*.gz) gzip -dc "$f" >"$ko" ;;
	*) cp "$f" "$ko" ;;
	esac
	deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$ko" | head -n 1 | cut -d= -f2 | tr ',' ' ')
	for d in $deps; do place_module "$d"; done
	order+=("$n.ko")
}
for cfg in VIRTIO_PCI VIRTIO_BLK VIRTIO_NET; do
	case "$(sed -n "s/^CONFIG_$cfg=//p" "$KCONFIG")" in
	y) ;;
	m) place_module "$(echo "$cfg" | tr 'A-Z' 'a-z')" ;;
	*) die "kernel $KVER has CONFIG_$cfg neither built in nor as a module" ;;
	esac
done
printf '%s\n' "${order[@]}" >"$stage_dir/etc/modules.order"
echo "  modules: ${order[*]:-none (built in)}"
cat >"$stage_dir/etc/workload.conf" <<EOF
WORKLOAD='$WORKLOAD'
VCPUS=$VCPUS
DISKS=$DISKS
BLOCK_SIZES='$BLOCK_SIZES'
DD_KB=$DD_KB
NIC_PAIRS=$NIC_PAIRS
NET_KB=$NET_KB
DOMAIN_CYCLES=$DOMAIN_CYCLES
DOMAIN_KB=$DOMAIN_KB
EOF
INITRD="$OUT/initramfs.cpio.gz"
(cd "$stage_dir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$INITRD" ||
	die "cpio could not build the initramfs"
echo "  $(du -h "$INITRD" | cut -f1) $INITRD"

# --- 4. boot the guest and run the workload ------------------------------------------------------
step "boot: $VCPUS vCPUs, iommu.strict=$STRICT, $DISKS disk(s), $NIC_PAIRS NIC pair(s); QEMU timeout ${TIMEOUT}s"
LOG="$OUT/qemu.log"
CONSOLE="$OUT/console.log"
rm -f "$LOG" "$CONSOLE"
# shellcheck disable=SC2054 # the commas are QEMU's
qemu=(qemu-system-aarch64
	-M virt,iommu=smmuv3 -cpu "$QEMU_CPU" -smp "$VCPUS" -m "$MEM" -accel tcg,thread=multi
	-nodefaults -display none -monitor none -serial stdio -no-reboot
	-kernel "$VMLINUZ" -initrd "$INITRD"
	-append "console=ttyAMA0 rdinit=/init iommu.strict=$STRICT panic=-1 loglevel=4")
# romfile= on the NICs: the guest boots with -kernel, so no iPXE option ROM is needed (and the
# ipxe-qemu package that ships one is only a recommendation of qemu-system-arm).
i=0
while [ "$i" -lt "$DISKS" ]; do
	img="$OUT/disk$i.img"
	[ -f "$img" ] && [ "$(stat -c %s "$img")" -eq $((DISK_MB * 1048576)) ] || {
		rm -f "$img"
		truncate -s "${DISK_MB}M" "$img"
	}
	qemu+=(-drive "if=none,id=d$i,file=$img,format=raw,cache=unsafe"
		-device "virtio-blk-pci,drive=d$i,iommu_platform=on,disable-legacy=on")
	i=$((i + 1))
done
p=0
while [ "$p" -lt "$NIC_PAIRS" ]; do
	for side in 0 1; do
		qemu+=(-netdev "hubport,id=n$p$side,hubid=$p"
			-device "virtio-net-pci,netdev=n$p$side,mac=52:54:00:c0:0$p:0$side,iommu_platform=on,disable-legacy=on,romfile=")
	done
	p=$((p + 1))
done
# -msg timestamp=on makes the log backend prefix each event with PID@SECONDS.MICROSECONDS:, the
# time the import turns into the trace's timestamps (without it QEMU 7.2 prints bare events).
qemu+=(-msg timestamp=on -D "$LOG")
# TRACE is a list of QEMU -trace patterns; one starting with '-' turns events off again.
set -f
for pattern in $TRACE; do qemu+=(-trace "$pattern"); done
set +f
printf '%q ' "${qemu[@]}" >"$OUT/cmdline.txt"
echo >>"$OUT/cmdline.txt"
echo "  command line in $OUT/cmdline.txt; console in $CONSOLE"
boot_start=$(date +%s)
set +e
timeout --kill-after=10 "$TIMEOUT" "${qemu[@]}" </dev/null 2>&1 | tee "$CONSOLE" | grep --line-buffered '^vcmdq-guest:' | sed 's/^/  /'
rcs=("${PIPESTATUS[@]}")
set -e
boot_secs=$(($(date +%s) - boot_start))
[ "${rcs[0]}" -ne 124 ] && [ "${rcs[0]}" -ne 137 ] ||
	die "QEMU ran past TIMEOUT=${TIMEOUT}s (raise TIMEOUT, or shrink the workload); console in $CONSOLE"
[ "${rcs[0]}" -eq 0 ] || die "QEMU exited with status ${rcs[0]}; console in $CONSOLE"
status=$(sed -n 's/^VCMDQ-WORKLOAD-STATUS=\([0-9]*\).*/\1/p' "$CONSOLE" | tail -n 1)
[ -n "$status" ] || die "the guest powered off without finishing its workload (no status line); console in $CONSOLE"
[ "$status" = 0 ] || die "the guest's workload reported problems (status $status): see the PROBLEM lines in $CONSOLE"
[ -s "$LOG" ] || die "QEMU wrote no trace log to $LOG"
echo "  guest ran ${boot_secs}s; log $(du -h "$LOG" | cut -f1), $(grep -c 'smmuv3_cmdq_opcode' "$LOG" || true) commands consumed"

# --- 5. the record of how it was made ------------------------------------------------------------
step "notes: $OUT/capture.txt"
{
	echo "workload:        $WORKLOAD (STRICT=$STRICT VCPUS=$VCPUS DISKS=$DISKS BLOCK_SIZES='$BLOCK_SIZES' DD_KB=$DD_KB NIC_PAIRS=$NIC_PAIRS NET_KB=$NET_KB DOMAIN_CYCLES=$DOMAIN_CYCLES DOMAIN_KB=$DOMAIN_KB MEM=$MEM QEMU_CPU=$QEMU_CPU)"
	echo "kernel:          $KERNEL_PKG $KERNEL_VERSION (arm64), $KVER"
	echo "busybox:         busybox-static $BUSYBOX_VERSION (arm64)"
	echo "qemu:            $QEMU_VERSION"
	echo "host:            $(. /etc/os-release && echo "$PRETTY_NAME"), $(nproc) cores"
	echo "guest seconds:   $boot_secs"
	echo "command line:    $(cat "$OUT/cmdline.txt")"
} >"$OUT/capture.txt"

if [ "$IMPORT" = 0 ]; then
	echo "linux-trace: IMPORT=0, stopping with the raw log $LOG"
	exit 0
fi

# --- 6. the vcmdq binary ------------------------------------------------------------------------
step "vcmdq: $VCMDQ"
if [ ! -x "$VCMDQ" ]; then
	command -v cargo >/dev/null || die "$VCMDQ is not built and there is no cargo to build it"
	(cd "$REPO" && cargo build --release -p vcmdq-cli) || die "cargo build --release -p vcmdq-cli failed"
fi

# --- 7. import ----------------------------------------------------------------------------------
VCT="$OUT/trace.vct"
step "import: vcmdq trace import-qemu $LOG -o $VCT"
"$VCMDQ" trace import-qemu "$LOG" -o "$VCT" 2>&1 | tee "$OUT/import.txt" | sed 's/^/  /'
[ "${PIPESTATUS[0]}" -eq 0 ] || die "vcmdq trace import-qemu refused $LOG (see $OUT/import.txt)"
"$VCMDQ" trace info "$VCT" >"$OUT/info.txt" || die "vcmdq trace info $VCT failed"
sed 's/^/  /' "$OUT/info.txt"

# --- 8. replay ----------------------------------------------------------------------------------
step "replay: vcmdq replay $VCT"
"$VCMDQ" replay "$VCT" 2>&1 | tee "$OUT/replay.txt" | sed 's/^/  /'
[ "${PIPESTATUS[0]}" -eq 0 ] || die "vcmdq replay $VCT failed (see $OUT/replay.txt)"
echo "linux-trace: done in $(($(date +%s) - t0))s: $VCT (raw log $LOG)"
