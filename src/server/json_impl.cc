// Boost.JSON, compiled into Sluice from its headers (Debian ships it header-only-capable;
// this spares a link dependency on libboost-json).
#include <boost/json/src.hpp>
