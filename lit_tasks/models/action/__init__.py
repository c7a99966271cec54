"""Online action detection: OadTR."""
