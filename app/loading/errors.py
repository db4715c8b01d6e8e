"""The one error of a load that is not the gateway's own (those are `app.errors`): every module of the
package raises it, and the CLI turns it into exit status 2."""


class MaterializeError(Exception):
    """Bad arguments, a file that cannot be read or whose columns do not fit, a foreign checkpoint.

    Raised before anything is written, except when a file turns out unreadable partway (then it says so).
    """
