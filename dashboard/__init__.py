"""The nursery_down dashboard: a quart-trio app served by hypercorn in the supervisor's nursery."""
