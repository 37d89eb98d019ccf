"""Names for every device: the mesh domain's DNS server on the agent (docs/names.md).

``zone`` (pure: map → records, query bytes → answer bytes), ``server`` (UDP and TCP
on the tunnel addresses, and the forwarding to upstream and split-zone
nameservers), ``hostconfig`` (the host's resolver: systemd-resolved per link, or a
managed /etc/resolv.conf), ``service`` (what the agent daemon calls).
"""
