"""ddmkit: Decentralized Diffusion Models.

Time convention (one for the whole code base): t in [0, 1], t = 0 is data,
t = 1 is noise, x_t = (1 - t) x + t eps, velocity target v = eps - x,
sampling integrates dx/dt = v from t = 1 down to t = 0.
"""
__version__ = "0.1.0"
TIME_CONVENTION = "linear: x_t=(1-t)x+t*eps, v=eps-x, t=0 data"
