#!/bin/sh
# The capture guest's workload: DMA through the emulated SMMUv3 so that Linux's arm-smmu-v3
# driver writes its command queue. Run by /init with the path of workload.conf, whose variables
# capture.sh writes from its parameters (see traces/linux/README.md):
#   WORKLOAD       name, only for the log
#   VCPUS          vCPUs in the guest; each block phase runs one dd pinned to each of them so
#                  that several CPUs share the SMMU's one command queue
#   DISKS          virtio-blk disks (/dev/vda, ...)
#   BLOCK_SIZES    dd block sizes in bytes, e.g. "4096 65536 1048576"
#   DD_KB          KiB read (and then written) with O_DIRECT per block size per disk
#   NIC_PAIRS      pairs of virtio-net NICs, each pair on its own QEMU hub; one NIC of a pair is
#                  moved into a second network namespace so traffic between them leaves the guest
#   NET_KB         KiB fetched over HTTP each way between the NICs of each pair
#   DOMAIN_CYCLES  times the first disk's IOMMU group is switched identity -> DMA-FQ -> DMA
#   DOMAIN_KB      KiB read with O_DIRECT after each switch
set -u
# shellcheck disable=SC1090 # capture.sh writes it
. "$1"

say() { echo "vcmdq-guest: [$(cut -d' ' -f1 /proc/uptime)s] $*"; }
fail=0
problem() { say "PROBLEM: $*"; fail=1; }

# The PCI address (BDF) of the virtio device whose block device is $1 (e.g. vda).
bdf_of_block() { basename "$(readlink -f "/sys/block/$1/device/..")"; }
# The block device (vda, ...) of the virtio PCI device $1, or nothing while it has none.
block_of_bdf() { ls "/sys/bus/pci/devices/$1"/virtio*/block 2>/dev/null | head -n 1; }
# The interface whose MAC is $1.
iface_of_mac() {
	for n in /sys/class/net/*; do
		[ "$(cat "$n/address")" = "$1" ] && basename "$n" && return 0
	done
	return 1
}

# One O_DIRECT dd per vCPU, each pinned to its CPU, each on its own part of the disk.
# $1 device, $2 block size (bytes), $3 KiB in all, $4 "read" or "write".
dd_spread() {
	dev=$1 bs=$2 kb=$3 dir=$4
	per=$((kb * 1024 / bs / VCPUS))
	[ "$per" -ge 1 ] || per=1
	pids=""
	cpu=0
	while [ "$cpu" -lt "$VCPUS" ]; do
		off=$((cpu * per))
		if [ "$dir" = read ]; then
			taskset -c "$cpu" dd if="/dev/$dev" of=/dev/null bs="$bs" count="$per" skip="$off" iflag=direct 2>/tmp/dd.$cpu &
		else
			taskset -c "$cpu" dd if=/dev/zero of="/dev/$dev" bs="$bs" count="$per" seek="$off" oflag=direct 2>/tmp/dd.$cpu &
		fi
		pids="$pids $!"
		cpu=$((cpu + 1))
	done
	cpu=0
	for p in $pids; do
		wait "$p" || problem "dd $dir /dev/$dev bs=$bs on cpu $cpu failed: $(cat /tmp/dd.$cpu)"
		cpu=$((cpu + 1))
	done
}

say "workload $WORKLOAD: vcpus=$VCPUS disks=$DISKS block_sizes='$BLOCK_SIZES' dd_kb=$DD_KB nic_pairs=$NIC_PAIRS net_kb=$NET_KB domain_cycles=$DOMAIN_CYCLES"
say "cpus online: $(cat /sys/devices/system/cpu/online); cmdline: $(cat /proc/cmdline)"
for g in /sys/kernel/iommu_groups/*; do
	[ -d "$g" ] || continue
	say "iommu group $(basename "$g"): type $(cat "$g/type" 2>/dev/null) devices $(ls "$g/devices" | tr '\n' ' ')"
done

# --- block: O_DIRECT reads then writes at each block size, on every disk -----------------------
say "phase block: start"
i=0
for blk in /sys/block/vd*; do
	[ -e "$blk" ] && [ "$i" -lt "$DISKS" ] || break
	d=${blk##*/}
	for bs in $BLOCK_SIZES; do
		dd_spread "$d" "$bs" "$DD_KB" read
		dd_spread "$d" "$bs" "$DD_KB" write
		say "block $d bs=$bs: ${DD_KB} KiB read and written"
	done
	i=$((i + 1))
done
[ "$i" -ge "$DISKS" ] || problem "found $i virtio disks, expected $DISKS"
say "phase block: end"

# --- network: HTTP both ways between the two NICs of each pair, a block read beside it ---------
# (busybox's small nc stops after its first read, so the bulk transfer is httpd and wget.)
say "phase net: start"
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/www/blob bs=1024 count="$NET_KB" 2>/dev/null
p=0
nspids=""
while [ "$p" -lt "$NIC_PAIRS" ]; do
	a=$(iface_of_mac "52:54:00:c0:0$p:00") || { problem "no NIC with MAC 52:54:00:c0:0$p:00"; break; }
	b=$(iface_of_mac "52:54:00:c0:0$p:01") || { problem "no NIC with MAC 52:54:00:c0:0$p:01"; break; }
	# A process that holds a second network namespace for NIC b of this pair.
	unshare -n sleep 100000 &
	ns=$!
	nspids="$nspids $ns"
	sleep 1
	ip link set "$b" netns "$ns" || problem "cannot move $b into a network namespace"
	ip addr add "10.0.$p.1/24" dev "$a"
	ip link set "$a" up
	nsenter -t "$ns" -n ip addr add "10.0.$p.2/24" dev "$b"
	nsenter -t "$ns" -n ip link set "$b" up
	nsenter -t "$ns" -n ip link set lo up
	sleep 1
	ping -c 2 -W 2 -s 1400 "10.0.$p.2" >/tmp/ping.$p 2>&1 || problem "pair $p: $a cannot reach $b: $(tail -n 2 /tmp/ping.$p)"
	nsenter -t "$ns" -n httpd -p "10.0.$p.2:80" -h /tmp/www || problem "pair $p: httpd on $b did not start"
	httpd -p "10.0.$p.1:80" -h /tmp/www || problem "pair $p: httpd on $a did not start"
	sleep 1
	side=""
	if [ "$VCPUS" -gt 1 ] && [ "$DISKS" -ge 1 ]; then
		taskset -c 1 dd if=/dev/vda of=/dev/null bs=4096 count=$((NET_KB / 4)) iflag=direct 2>/dev/null &
		side=$!
	fi
	got=$(timeout 120 taskset -c 0 wget -q -O - "http://10.0.$p.2/blob" | wc -c)
	[ "$got" -eq $((NET_KB * 1024)) ] || problem "pair $p: $a fetched $got bytes from $b, not $((NET_KB * 1024))"
	got=$(timeout 120 nsenter -t "$ns" -n wget -q -O - "http://10.0.$p.1/blob" | wc -c)
	[ "$got" -eq $((NET_KB * 1024)) ] || problem "pair $p: $b fetched $got bytes from $a, not $((NET_KB * 1024))"
	[ -z "$side" ] || wait "$side" || true
	say "net pair $p ($a <-> $b): $NET_KB KiB each way over HTTP"
	p=$((p + 1))
done
for ns in $nspids; do kill "$ns" 2>/dev/null; done
say "phase net: end"

# --- domains: switch the first disk's IOMMU group between identity, DMA-FQ and DMA ----------
say "phase domains: start"
if [ "$DOMAIN_CYCLES" -gt 0 ] && [ "$DISKS" -ge 1 ]; then
	bdf=$(bdf_of_block vda)
	grp="/sys/bus/pci/devices/$bdf/iommu_group"
	orig=$(cat "$grp/type")
	c=0
	while [ "$c" -lt "$DOMAIN_CYCLES" ]; do
		for t in identity DMA-FQ DMA "$orig"; do
			echo "$bdf" >"/sys/bus/pci/devices/$bdf/driver/unbind" || problem "cannot unbind $bdf"
			echo "$t" >"$grp/type" || problem "cannot set group of $bdf to $t"
			echo "$bdf" >/sys/bus/pci/drivers/virtio-pci/bind || problem "cannot bind $bdf again"
			dev=""
			n=0
			while [ -z "$dev" ] && [ "$n" -lt 50 ]; do
				dev=$(block_of_bdf "$bdf")
				[ -n "$dev" ] && [ -b "/dev/$dev" ] || { dev=""; sleep 0.2; }
				n=$((n + 1))
			done
			if [ -z "$dev" ]; then
				problem "no block device on $bdf after setting its group to $t"
				continue
			fi
			dd if="/dev/$dev" of=/dev/null bs=4096 count=$((DOMAIN_KB / 4)) iflag=direct 2>/dev/null ||
				problem "dd on /dev/$dev with a $t domain failed"
			dd if="/dev/$dev" of=/dev/null bs=65536 count=$((DOMAIN_KB / 64 + 1)) iflag=direct 2>/dev/null ||
				problem "dd on /dev/$dev with a $t domain failed"
			say "domain cycle $c: group of $bdf is $(cat "$grp/type"), $DOMAIN_KB KiB read from /dev/$dev"
		done
		c=$((c + 1))
	done
fi
say "phase domains: end"

dmesg | grep -i -E 'smmu|iommu|virtio' | grep -v -i 'adding to iommu group' | tail -n 20
exit "$fail"
