"""replicator: keeps a standby firewall's conntrack table in step with the active one."""

__version__ = "0.1.0"
