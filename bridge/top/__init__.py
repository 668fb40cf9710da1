"""`flowbridge top`: the live terminal view of the host's flows.

table  -> the latest observation of every live flow (fed by the agent or by top's own collector)
model  -> connections, per-process and per-remote-host groups, rates, sort orders
render -> rich renderables of one frame
live   -> the refresh loop, the keyboard, the two data sources
"""
