#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
insmod /mods/nvme-auth.ko; insmod /mods/nvme-core.ko; insmod /mods/nvme.ko
for i in $(seq 50); do [ -e /dev/nvme0 ] && break; sleep 0.2; done
sleep 1
rec() { name=$1; shift; echo "=== BEGIN $name: $*"; "$@" >/tmp/o 2>/tmp/e; rc=$?; cat /tmp/o; echo "--- STDERR"; cat /tmp/e; echo "=== END $name rc=$rc"; }
D=/dev/nvme0
rec sysfs-ctrl ls -l /sys/class/nvme/nvme0/
rec sysfs-ctrl-link sh -c 'readlink /sys/class/nvme/nvme0; readlink /sys/class/nvme/nvme0/device; readlink -f /sys/class/nvme/nvme0/device'
rec sysfs-attrs sh -c 'for a in subsysnqn cntlid address transport state model serial; do echo "$a=$(cat /sys/class/nvme/nvme0/$a)"; done'
rec sysfs-pci sh -c 'for a in sriov_numvfs sriov_totalvfs sriov_offset sriov_stride; do echo "$a=$(cat /sys/class/nvme/nvme0/device/$a)"; done; ls /sys/class/nvme/nvme0/device/nvme'
rec sysfs-block ls -l /sys/block/
rec sysfs-blockdir sh -c 'ls /sys/block/nvme0n1/; echo nsid=$(cat /sys/block/nvme0n1/nsid); readlink /sys/block/nvme0n1/device'
rec version nvme version
rec sysfs-subsys sh -c 'cat /sys/block/nvme0n1/device/subsysnqn; ls /sys/class/nvme-subsystem/nvme-subsys0/; readlink /sys/bus/pci/devices/0000:00:02.0'
rec id-ctrl nvme id-ctrl $D -o json
rec list-ns nvme list-ns $D -o json
rec list-ns-all nvme list-ns $D --all -o json
rec list-ctrl nvme list-ctrl $D -o json
rec list-ctrl-n1 nvme list-ctrl $D -n 1 -o json
rec list-ctrl-n2 nvme list-ctrl $D -n 2 -o json
rec id-ns-1 nvme id-ns $D -n 1 -o json
rec id-ns-1-force nvme id-ns $D -n 1 --force -o json
rec id-ns-2 nvme id-ns $D -n 2 -o json
rec id-ns-2-force nvme id-ns $D -n 2 --force -o json
rec id-ns-all nvme id-ns $D -n 0xffffffff -o json
rec effects-log nvme effects-log $D --csi=0 -o json
rec list-secondary nvme list-secondary $D -o json
rec primary-ctrl-caps nvme primary-ctrl-caps $D -o json
CNT=$(cat /sys/class/nvme/nvme0/cntlid)
rec create-ns nvme create-ns $D --nsze=2048 --ncap=2048 --flbas=0
rec delete-ns nvme delete-ns $D -n 2
rec attach-ns-2 nvme attach-ns $D -n 2 -c $CNT
rec ns-rescan nvme ns-rescan $D
sleep 1
rec sysfs-block-after ls -l /sys/block/
rec block-nsid sh -c 'for b in /sys/block/nvme*; do echo "$b $(cat $b/nsid)"; done'
rec list-ns-after nvme list-ns $D -o json
rec list-ctrl-n2-after nvme list-ctrl $D -n 2 -o json
rec attach-ns-2-again nvme attach-ns $D -n 2 -c $CNT
rec detach-ns-2 nvme detach-ns $D -n 2 -c $CNT
rec sriov-enable sh -c 'echo 0 > /sys/class/nvme/nvme0/device/sriov_drivers_autoprobe; echo 2 > /sys/class/nvme/nvme0/device/sriov_numvfs; echo rc=$?; cat /sys/class/nvme/nvme0/device/sriov_numvfs; ls -l /sys/class/nvme/nvme0/device/ | grep virtfn'
sleep 1
rec list-secondary-enabled nvme list-secondary $D -o json
SC=$(nvme list-secondary $D -o json | grep -m1 secondary-controller-identifier | tr -dc 0-9)
rec attach-ns-2-offline-vf nvme attach-ns $D -n 2 -c $SC
rec detach-ns-2-vf nvme detach-ns $D -n 2 -c $SC
rec virt-mgmt-vq nvme virt-mgmt $D --cntlid=$SC --rt=0 --act=8 --nr=2
rec virt-mgmt-vi nvme virt-mgmt $D --cntlid=$SC --rt=1 --act=8 --nr=1
rec virt-mgmt-online nvme virt-mgmt $D --cntlid=$SC --act=9
rec list-secondary-online nvme list-secondary $D -o json
rec attach-ns-2-vf nvme attach-ns $D -n 2 -c $SC
rec list-ctrl-n2-vf nvme list-ctrl $D -n 2 -o json
rec list-ns-all-vf nvme list-ns $D --all -o json
rec id-ns-2-vf nvme id-ns $D -n 2 -o json
rec id-ns-2-vf-force nvme id-ns $D -n 2 --force -o json
rec sysfs-class-all ls -l /sys/class/nvme/
rec detach-ns-2-vf-end nvme detach-ns $D -n 2 -c $SC
rec list-ctrl-n2-end nvme list-ctrl $D -n 2 -o json
rec dmesg-nvme sh -c 'dmesg | grep -i nvme'
echo "=== DONE"
poweroff -f
