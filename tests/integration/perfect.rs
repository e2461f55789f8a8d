//! perfect end to end against the simulator (to be written).
