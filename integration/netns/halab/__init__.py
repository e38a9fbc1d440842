"""The failover drill lab: a real keepalived firewall pair in network namespaces.

Clients sit on a LAN bridge, two firewalls (``a`` preferred, ``b`` backup) share an
inside VIP (the clients' gateway) and an outside VIP (the SNAT address and the DNAT
port-forward address) under one VRRP sync group, and servers sit on a WAN bridge. The
firewalls run the same strictly stateful nftables ruleset, so an established flow can
only survive a failover if its conntrack entry was replicated to the new master.

Modules, one job each:

``topology``     address plan, namespaces, bridges, veths, addresses and routes
``firewall``     the nftables ruleset and the firewall sysctls
``keepalived``   keepalived configuration, process control and transition logs
``replication``  the hook a state-replication system plugs into (``NoReplication`` here)
``conntrackd``   ``ConntrackdReplication``: conntrack-tools FTFW as a positive control
``replicator``   ``ReplicatorReplication``: replicator wired as docs/operations.md says
``agent``        standalone traffic / address-watch agent run inside the namespaces
``traffic``      the test-side handles of those agents
``drill``        failover events and their measurements
``tcpstats``     the endpoints' TCP counters (retransmissions, RTO expiries) per event
``stalls``       why a flow stalled: its longest gap against the path's return
``report``       plain-text rendering of drill results
"""
