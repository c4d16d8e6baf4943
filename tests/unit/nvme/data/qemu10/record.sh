#!/bin/bash
# Record nvme-cli 2.3 output against QEMU 10's emulated NVMe controller (see README.md).
# Usage: record.sh KERNEL_DIR   (an unpacked Debian linux-image: boot/vmlinuz-*, lib/modules/*)
# Writes transcript.txt (the guest's serial console) next to this script, then splits it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kdir=${1:?usage: record.sh KERNEL_DIR}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
r=$work/root; mkdir -p $r/{bin,sbin,dev,proc,sys,tmp,mods,etc/nvme}
mods=$(echo $kdir/lib/modules/*/kernel/drivers/nvme)
for m in common/nvme-auth host/nvme-core host/nvme; do xz -dc $mods/$m.ko.xz > $r/mods/$(basename $m).ko; done
cp /usr/bin/busybox $r/bin/; cp /usr/sbin/nvme $r/sbin/
for l in $(ldd /usr/sbin/nvme | grep -o '/lib[^ ]*'); do mkdir -p $r$(dirname $l); cp -L $l $r$l; done
install -m 755 $here/guest-init.sh $r/init
(cd $r && find . | cpio -o -H newc 2>/dev/null | gzip -1 > $work/initrd.gz)
truncate -s 64M $work/ns1.img $work/ns2.img
# KVM inside this workplace's VM fails to emulate some instructions: TCG is fast enough (~15 s).
timeout 500 qemu-system-x86_64 -accel tcg -cpu max -machine q35 -m 512 -smp 1 -nographic -no-reboot -net none \
  -kernel $(echo $kdir/boot/vmlinuz-*) -initrd $work/initrd.gz \
  -append "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init" \
  -drive file=$work/ns1.img,if=none,format=raw,id=d1 -drive file=$work/ns2.img,if=none,format=raw,id=d2 \
  -device nvme-subsys,id=subsys0,nqn=coreslice-test \
  -device nvme,serial=cs0001,subsys=subsys0,id=nvme0,sriov_max_vfs=2,sriov_vq_flexible=8,sriov_vi_flexible=4,sriov_max_vi_per_vf=2,sriov_max_vq_per_vf=4 \
  -device nvme-ns,drive=d1,nsid=1,logical_block_size=512,physical_block_size=512 \
  -device nvme-ns,drive=d2,nsid=2,detached=true,logical_block_size=4096,physical_block_size=4096 \
  | tr -d '\r' | sed -n '/^.*=== BEGIN/,$p' | sed '1s/^.*=== BEGIN/=== BEGIN/' > $here/transcript.txt
python3 $here/split.py $here/transcript.txt $here
