"""`flowbridge top`: the live terminal view of the host's flows.

view   -> flow rows read from a flow cache (the agent's, or top's own collector's)
model  -> connections, per-process and per-remote-host groups, rates, sort orders
render -> rich renderables of one frame
live   -> the refresh loop, the keyboard, the two data sources
"""
