#pragma once
#include "emu_types.h"
