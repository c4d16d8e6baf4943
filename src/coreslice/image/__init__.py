"""Slice disk images: root file systems, GPT + ext4 without mounts, cloud-init seeds.

``coreslice image build`` (build.py) turns a root tarball (download.py: a file or a resumable
URL download) or a Debian suite (rootfs.py: mmdebstrap) into a bootable disk (disk.py: sfdisk +
``mkfs.ext4 -d`` straight from the tarball) with a NoCloud seed (cloudinit.py), and copies the
kernel and initrd out for ``coreslice boot --image``.
"""
