"""Small, pure, fully tested functions (box formats, IoU, target assignment, distributed helpers)."""
