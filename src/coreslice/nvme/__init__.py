"""NVMe namespace management through nvme-cli (see ops.py)."""
