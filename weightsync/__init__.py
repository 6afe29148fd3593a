"""The weight-sync protocol both sides share: bucket plan, wire format, authenticated group formation."""
